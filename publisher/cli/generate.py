"""`publisher generate`: thin over publisher.generate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from publisher.errors import PublisherError


def generate_command(
    folder: Annotated[Path, typer.Argument(help="A variant folder (with build-info.json and packages/).")],
    prompt: Annotated[str, typer.Option("--prompt", help="What to draw.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The PNG to write.")],
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="What not to draw.")] = "",
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of the latent noise.")] = 0,
    steps: Annotated[int, typer.Option("--steps", min=1, max=1000, help="Denoising steps.")] = 20,
    scheduler: Annotated[str, typer.Option("--scheduler", help="pndm (the Swift default) or dpm-solver++.")]
    = "pndm",
    guidance: Annotated[float, typer.Option("--guidance", min=0, max=50, help="Classifier-free guidance scale.")]
    = 7.5,
    disable_safety: Annotated[bool, typer.Option("--disable-safety", help="Skip the variant's safety checker (the "
                                                                          "Swift configuration's disableSafety).")]
    = False,
    refiner: Annotated[bool, typer.Option("--refiner/--no-refiner", help="SDXL: switch to the variant's refiner "
                                                                         "at 80% of the steps (as the Swift pipeline "
                                                                         "does) where it has one.")] = True,
    runtime: Annotated[str, typer.Option("--runtime", help="executor (the project's MIL executor, any OS) or "
                                                           "coreml (Core ML, macOS).")] = "executor",
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Folder with vocab.json and merges.txt "
                                                                       "(default: the variant's compiled/).")] = None,
    reference: Annotated[Path | None, typer.Option("--reference", help="The source's diffusers folder: also "
                                                                       "generate with diffusers (float32) and "
                                                                       "compare.")] = None,
) -> None:
    """Text to image through a variant's packages only, as Apple's Swift pipeline runs them."""
    from tqdm import tqdm

    from publisher.generate import GenerateSettings, generate_with, save_png, variant_packages
    from publisher.generate_reference import compare, reference_generate
    from publisher.verify.runtime import runtime_named

    if not folder.is_dir():
        raise PublisherError(f"{folder}: not a variant folder")
    settings = GenerateSettings(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                                scheduler=scheduler, guidance=guidance, refiner=refiner, safety=not disable_safety)
    engine = runtime_named(runtime)
    models = variant_packages(folder, engine, tokenizer)
    with tqdm(total=steps, desc="denoising", unit="step", disable=None) as bar:  # None: off when not a terminal
        result = generate_with(models, settings, progress=lambda done, total: bar.update(1))
    if result.safe is False:
        raise PublisherError(f"the variant's safety checker flagged the image (the Swift pipeline returns none): "
                             f"{output} not written (--disable-safety writes it)")
    save_png(result.image, output)
    checked = "" if result.safe is None else ", passed the safety checker"
    typer.echo(f"wrote {output} ({result.image.shape[1]}x{result.image.shape[0]}, seed {seed}, {steps} steps, "
               f"{scheduler}, {engine.name}{checked})")
    if reference is not None:
        figures = compare(result, reference_generate(reference, settings, result.latents.shape, models.family))
        typer.echo(f"against diffusers (float32): latents {figures['latents_psnr_db']:.1f} dB, image "
                   f"{figures['image_psnr_db']:.1f} dB")
