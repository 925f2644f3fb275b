"""Text to image through a built variant's packages, the way Apple's Swift `StableDiffusionPipeline` runs them.

No PyTorch model: the tokenizer files (vocab.json, merges.txt; padded with the end token to 77, as the Swift
BPETokenizer does), the text encoder's `last_hidden_state` for the negative prompt and the prompt (classifier-free
guidance as a batch of 2, (2, C, 1, 77)), latent noise from NumPy's seeded legacy generator (the Swift
`NumPyRandomSource` reproduces it), the Swift scheduler's defaults (PNDM: scaled-linear betas 0.00085-0.012, 1000
training steps, "leading" spacing with offset 1; DPM-Solver++: order 2, lower-order final step, "linspace"
spacing), the UNet whole or as its two chunks in order (chunk 2 takes chunk 1's outputs and the UNet's inputs by
name), guidance `uncond + g * (text - uncond)`, then the VAE decoder on latents / scale factor, mapped from [-1, 1]
to 8-bit RGB. The schedulers are diffusers' classes set up as the Swift ones are (numbers, not a model).

`reference_generate` runs the same prompt, noise and scheduler through diffusers' pipeline in float32 on the
source; `compare` gives the PSNR of the final latents and of the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from publisher.build_info import BUILD_INFO, read_build_info
from publisher.errors import PublisherError
from publisher.family import family_named
from publisher.metrics import psnr
from publisher.verify.runtime import Model, Runtime

SCHEDULERS = ("pndm", "dpm-solver++")
SD_DECODER_SCALE = 0.18215  # the Swift configuration's default encoder/decoder scale factor
TOKENS = 77


@dataclass(frozen=True)
class GenerateSettings:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    scheduler: str = "pndm"
    guidance: float = 7.5


@dataclass
class Generated:
    latents: np.ndarray  # the final latents (1, 4, h, w), before the decoder's scale factor
    image: np.ndarray  # (H, W, 3) uint8
    timesteps: list[int] = field(default_factory=list)


def swift_scheduler(name: str, steps: int) -> Any:
    """A diffusers scheduler with the Swift package's settings (it reads no scheduler config)."""
    common = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    if name == "pndm":
        from diffusers import PNDMScheduler

        scheduler: Any = PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                       timestep_spacing="leading")
    elif name == "dpm-solver++":
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                lower_order_final=True, timestep_spacing="linspace")
    else:
        raise PublisherError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not '{name}'")
    scheduler.set_timesteps(steps)
    return scheduler


def latent_noise(seed: int, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """The Swift `NumPyRandomSource`'s normal samples: NumPy's legacy seeded generator (MT19937, polar method)."""
    return (np.random.RandomState(seed).standard_normal(shape) * sigma).astype(np.float32)


def tokenize(folder: Path, text: str) -> np.ndarray:
    """(1, 77) float32 token ids, as the Swift BPETokenizer makes them from vocab.json and merges.txt."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    ids = tokenizer(text.strip(), padding="max_length", max_length=TOKENS, truncation=True)["input_ids"]
    return np.asarray([ids], dtype=np.float32)


def to_image(decoded: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return (np.clip(decoded[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


class PackageSet:
    """A variant's packages by submodule (each opened once in the runtime), its tokenizer files and the VAE scale
    factor the app configures."""

    def __init__(self, packages: dict[str, Path], tokenizer: Path, scale: float, runtime: Runtime) -> None:
        for needed in ("text_encoder", "vae_decoder"):
            if needed not in packages:
                raise PublisherError(f"no {needed} package (a variant with the text encoder, the UNet and the VAE "
                                     "decoder generates)")
        if "unet" not in packages and "unet_chunk1" not in packages:
            raise PublisherError("no unet package")
        if not (tokenizer / "vocab.json").is_file() or not (tokenizer / "merges.txt").is_file():
            raise PublisherError(f"no vocab.json and merges.txt in {tokenizer}")
        self.packages, self.tokenizer, self.scale, self.runtime = packages, tokenizer, scale, runtime
        self._open: dict[str, Model] = {}

    def model(self, submodule: str) -> Model:
        if submodule not in self._open:
            self._open[submodule] = self.runtime.open(self.packages[submodule])
        return self._open[submodule]

    def unet(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The noise prediction: the two chunks in order where the variant has them (as the Swift pipeline prefers
        them), else the whole UNet."""
        if "unet_chunk1" in self.packages and "unet_chunk2" in self.packages:
            first = self.model("unet_chunk1")(inputs)
            return self.model("unet_chunk2")({**inputs, **first})["noise_pred"]
        return self.model("unet")(inputs)["noise_pred"]


def variant_packages(folder: Path, runtime: Runtime, tokenizer: Path | None = None) -> PackageSet:
    """A built (or downloaded) variant folder's packages, named as its build-info's source names them."""
    info_path = folder / BUILD_INFO
    if not info_path.is_file():
        raise PublisherError(f"{folder}: no {BUILD_INFO} (give a variant folder a build made)")
    info = read_build_info(info_path)
    family = family_named(info.variant.get("family", "sd"))
    if family.name != "sd":
        raise PublisherError(f"{folder}: generating with the '{family.name}' family is not supported yet")
    model_version = info.source.repo.replace("/", "_")
    packages: dict[str, Path] = {}
    for package in sorted((folder / "packages").glob("*.mlpackage")):
        submodule = family.submodule_of_package(package.name, model_version)
        if submodule is not None:
            packages[submodule] = package
    candidates = [tokenizer] if tokenizer is not None else [folder / "compiled", folder]
    found = next((c for c in candidates if (c / "vocab.json").is_file() and (c / "merges.txt").is_file()), None)
    if found is None:
        raise PublisherError(f"no vocab.json and merges.txt in {' or '.join(str(c) for c in candidates)} "
                             "(a packages-only variant: give --tokenizer)")
    scale = float(info.app.get("vae_scale_factor", SD_DECODER_SCALE)) if info.app else SD_DECODER_SCALE
    try:
        return PackageSet(packages, found, scale, runtime)
    except PublisherError as exc:
        raise PublisherError(f"{folder}: {exc}") from exc


def generate(folder: Path, settings: GenerateSettings, runtime: Runtime, tokenizer: Path | None = None,
             progress: Callable[[int, int], None] = lambda step, total: None) -> Generated:
    return generate_with(variant_packages(Path(folder), runtime, tokenizer), settings, progress)


def generate_with(models: PackageSet, settings: GenerateSettings,
                  progress: Callable[[int, int], None] = lambda step, total: None) -> Generated:
    import torch

    encoder = models.model("text_encoder")
    states = [encoder({"input_ids": tokenize(models.tokenizer, text)})["last_hidden_state"]
              for text in (settings.negative_prompt, settings.prompt)]
    hidden = np.concatenate(states, axis=0).transpose(0, 2, 1)[:, :, None, :]  # (2, C, 1, 77)
    decoder_input = next(t for t in _inputs(models.packages["vae_decoder"]) if t.name == "z")
    scheduler = swift_scheduler(settings.scheduler, settings.steps)
    latents = latent_noise(settings.seed, decoder_input.shape, float(scheduler.init_noise_sigma))
    timesteps = [int(t) for t in scheduler.timesteps]
    for index, t in enumerate(timesteps):
        sample = np.concatenate([latents, latents], axis=0)
        noise = models.unet({"sample": sample, "timestep": np.full((2,), t, dtype=np.float32),
                             "encoder_hidden_states": hidden})
        guided = noise[:1] + settings.guidance * (noise[1:] - noise[:1])
        latents = scheduler.step(torch.from_numpy(guided), t, torch.from_numpy(latents)).prev_sample.numpy()
        progress(index + 1, len(timesteps))
    decoded = models.model("vae_decoder")({"z": latents / models.scale})["image"]
    return Generated(latents=latents, image=to_image(decoded), timesteps=timesteps)


def _inputs(package: Path) -> list[Any]:
    from publisher.mlpackage import package_info

    return list(package_info(package).inputs)


def reference_generate(source: Path, settings: GenerateSettings, shape: tuple[int, ...]) -> Generated:
    """The same prompt, seed (the same NumPy noise) and scheduler through diffusers' StableDiffusionPipeline in
    float32 on the source folder."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from publisher.convert.weight_files import weights_variant

    def load(cls: Any, folder: str) -> Any:  # float32, whichever weight copy the build fetched
        path = Path(source) / folder
        return cls.from_pretrained(path, torch_dtype=torch.float32, variant=weights_variant(path)).eval()

    # the components generating needs, from the folders a build fetches (not the whole repo's model_index); typed
    # Any: diffusers' pipelines declare their components at run time
    pipe: Any = StableDiffusionPipeline(vae=load(AutoencoderKL, "vae"), text_encoder=load(CLIPTextModel, "text_encoder"),
                                   tokenizer=CLIPTokenizer.from_pretrained(Path(source) / "tokenizer"),
                                   unet=load(UNet2DConditionModel, "unet"),
                                   scheduler=swift_scheduler(settings.scheduler, settings.steps),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = latent_noise(settings.seed, shape, float(pipe.scheduler.init_noise_sigma))
    height, width = shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor
    with torch.no_grad():
        latents = pipe(settings.prompt, negative_prompt=settings.negative_prompt, height=height, width=width,
                       num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                       latents=torch.from_numpy(noise), output_type="latent").images
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return Generated(latents=latents.numpy(), image=to_image(decoded.numpy()),
                     timesteps=[int(t) for t in pipe.scheduler.timesteps])


def compare(ours: Generated, reference: Generated) -> dict[str, float]:
    """PSNR (dB) of the final latents and of the 8-bit image against the reference."""
    return {"latents_psnr_db": round(psnr(reference.latents, ours.latents), 2),
            "image_psnr_db": round(psnr(reference.image.astype(np.float32), ours.image.astype(np.float32)), 2)}


def save_png(image: np.ndarray, path: Path) -> None:
    """Atomically (temp file + rename)."""
    import os
    import tempfile

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        Image.fromarray(image).save(temp, format="PNG")
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
