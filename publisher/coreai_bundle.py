"""A Core AI bundle (`coreai/` in a published repo) as Apple's Swift Core AI diffusion pipeline reads it
(apple/coreai-models `PipelineDescriptor.resolve(at:)`, `loadComponents(from:)`): `metadata.json` (schema 0.2,
`kind: diffusion`: the assets by component, the `diffusion` block read with snake_case keys: prediction type, scale
factors, `image_size`, checked against the UNet's `sample` height x 8, default steps and guidance, the scheduler's
betas), `tokenizer/vocab.json` and `merges.txt`, and one `.aimodel` per component. The facts only (no torch): the
assets are made by publisher.convert.coreai.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from publisher.compress.scheme import CompressionSettings
from publisher.errors import SourceError
from publisher.vocabulary import Component

FOLDER = "coreai"  # the bundle's folder in a published repo
METADATA = "metadata.json"
METADATA_VERSION = "0.2"
# component -> (asset name, input names, output names), Apple's; the metadata's asset keys are the component names
ASSETS: dict[Component, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    Component.TEXT_ENCODER: ("TextEncoder", ("input_ids",), ("last_hidden_state",)),
    Component.UNET: ("Unet", ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",)),
    Component.VAE_DECODER: ("VAEDecoder", ("z",), ("image",)),
    Component.VAE_ENCODER: ("VAEEncoder", ("image",), ("latent_params",)),
}
# the Swift loader throws without these; the VAE encoder is optional (image-to-image)
REQUIRED = (Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER)
COMPRESSIBLE = (Component.TEXT_ENCODER, Component.UNET)  # the VAE stays float16, as Apple's export keeps it
PALETTE_BITS = (1, 2, 4, 6, 8)  # what both Core ML's and Core AI's palettization take
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 7.5  # Apple's export's for SD 1.x/2.x
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the Swift pipeline's SD schedulers take


@dataclass(frozen=True)
class CoreAICompression:
    """How a bundle's text encoder and UNet weights are stored: float16, `int4` (Apple's preset: symmetric, per
    block of 32) or `palettize` at `nbits` (per tensor)."""

    kind: str = "float16"
    nbits: int = 0

    @property
    def label(self) -> str:
        return {"float16": "float16", "int4": "INT4 per-block (32)"}.get(self.kind, f"{self.nbits}-bit palettized")


def compression_for(precision: CompressionSettings, override: str) -> CoreAICompression | str:
    """The bundle's compression for a publish entry: `int4` when asked, else the entry's precision where Core AI
    has it (float16; a uniform per-tensor palettization); else why not, one line."""
    if override == "int4":
        return CoreAICompression("int4")
    settings: Any = precision
    name = precision.scheme.name
    if name == "float16":
        return CoreAICompression()
    nbits = getattr(settings, "nbits", None)
    if name == "palettize" and settings.mixed_bit is None and settings.recipe is None \
            and str(getattr(settings.granularity, "value", settings.granularity)) == "per_tensor" and nbits in PALETTE_BITS:
        return CoreAICompression("palettize", int(nbits))
    return (f"a Core AI bundle follows float16 or a uniform per-tensor palettization, not {precision.label} "
            "(set coreai_compression: int4, or publish the bundle from another entry)")


def bundle_metadata(name: str, assets: dict[str, str], image_size: int, vae: dict[str, Any],
                    scheduler: dict[str, Any], source: dict[str, Any], compression: CoreAICompression) -> dict[str, Any]:
    """metadata.json from the source's configs, as Apple's export writes it for SD 1.x/2.x; `image_size` is the
    size the UNet was exported at (the Swift loader checks it against `sample`). No compilation date: the file's
    bytes follow the inputs."""
    scale = vae.get("scaling_factor") or 0.18215
    prediction = scheduler.get("prediction_type") or "epsilon"
    if prediction not in PREDICTION_TYPES:
        raise SourceError(f"the scheduler's prediction_type {prediction!r} is not one Apple's Core AI pipeline takes "
                          f"({', '.join(PREDICTION_TYPES)})")
    return {
        "metadata_version": METADATA_VERSION,
        "kind": "diffusion",
        "name": name,
        "assets": assets,
        "diffusion": {
            "type": "stable-diffusion",
            "prediction_type": prediction,
            "encoder_scale_factor": scale,
            "decoder_scale_factor": scale,
            "decoder_shift_factor": vae.get("shift_factor") or 0.0,
            "image_size": image_size,
            "default_guidance_scale": DEFAULT_GUIDANCE,
            "default_steps": DEFAULT_STEPS,
            "scheduler": {
                "training_steps": scheduler.get("num_train_timesteps", 1000),
                "beta_start": scheduler.get("beta_start", 0.00085),
                "beta_end": scheduler.get("beta_end", 0.012),
                "beta_schedule": scheduler.get("beta_schedule", "scaled_linear"),
            },
        },
        "source": {"model_definition": "torch", **source},
        "compression": None if compression.kind == "float16" else compression.label,
    }


def asset_file(component: Component) -> str:
    return f"{ASSETS[component][0]}.aimodel"


def tokenizer_paths(bundle: Path) -> tuple[Path, Path]:
    return bundle / "tokenizer" / "vocab.json", bundle / "tokenizer" / "merges.txt"
