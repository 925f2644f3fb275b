"""The build's end-to-end check of a variant: a fixed set of seeded prompts generated through its packages
(publisher.generate) against diffusers' float32 pipeline on the source, and, for a compressed variant, against the
float16 packages it was compressed from; the figures, what produced them and one sample image.

The publish gate reads the figures back (publisher.gate): under the floor of the variant's precision, or more than
a margin under what the published revision recorded, a variant is not published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from publisher.gate import EVALUATION, SAMPLE, EvaluationSettings
from publisher.generate import Generated, GenerateSettings, PackageSet, generate_with, save_png
from publisher.generate_reference import compare, reference_generate
from publisher.util.atomic import atomic_write_text
from publisher.verify.runtime import Runtime

_GENERATED: dict[tuple[Any, ...], Generated] = {}


def _digest(packages: dict[str, Path]) -> tuple[Any, ...]:
    """The packages' identity in the store: the inodes of their files (a verified package is hard links of the
    converted one's files, so a compressed variant's float16 packages are the float16 variant's own)."""
    return tuple((name, tuple(sorted((f.stat().st_dev, f.stat().st_ino) for f in path.rglob("*") if f.is_file())))
                 for name, path in sorted(packages.items()))


def evaluate_to_folder(packages: dict[str, Path], float16: dict[str, Path] | None, source: Path, scale: float,
                       settings: EvaluationSettings, runtime_name: str, out: Path, family: str = "sd",
                       provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `evaluation.json` and `sample.png` (the first prompt's image) into `out`; returns the figures.
    `provenance`: what made them besides the settings (the source commit, the tool versions and code digest), kept
    in the record so that the repo's history of this file is the history of the model's quality."""
    from publisher.verify.runtime import runtime_named

    runtime: Runtime = runtime_named(runtime_name)

    def cached(key: tuple[Any, ...], make: Any, *args: Any) -> Generated:
        # within one process (a build that does not isolate its steps) the float32 reference of a source and a
        # float16 variant's generation are computed once for every variant that compares with them
        if key not in _GENERATED:
            _GENERATED[key] = make(*args)
        return _GENERATED[key]

    ours_set = PackageSet(packages, source / "tokenizer", scale, runtime, family)
    float_set = PackageSet(float16, source / "tokenizer", scale, runtime, family) if float16 else None
    rows = []
    for index, (prompt, seed) in enumerate(settings.prompts):
        generation = GenerateSettings(prompt=prompt, seed=seed, steps=settings.steps, scheduler=settings.scheduler,
                                      guidance=settings.guidance, refiner=False, safety=False)  # SDXL: the base
        ours = cached((_digest(packages), generation), generate_with, ours_set, generation)
        reference = cached((str(source), generation, ours.latents.shape), reference_generate, source, generation,
                           ours.latents.shape, family)
        row: dict[str, Any] = {"prompt": prompt, "seed": seed, **compare(ours, reference)}
        if float_set is not None and float16 is not None:
            float_images = cached((_digest(float16), generation), generate_with, float_set, generation)
            row["vs_float16"] = compare(ours, float_images)
        rows.append(row)
        if index == 0:
            save_png(ours.image, out / SAMPLE)
    figures: dict[str, Any] = {
        "image_psnr_db": min(r["image_psnr_db"] for r in rows),
        "latents_psnr_db": min(r["latents_psnr_db"] for r in rows),
    }
    if float_set is not None:
        figures["image_psnr_vs_float16_db"] = min(r["vs_float16"]["image_psnr_db"] for r in rows)
    record = {"figures": figures, "settings": settings.to_json(), "runtime": runtime.name, "reference":
              f"diffusers {'StableDiffusionXLPipeline' if family == 'sdxl' else 'StableDiffusionPipeline'}, "
              "float32, on the source", "per_prompt": rows, **(provenance or {})}
    atomic_write_text(out / EVALUATION, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return figures
