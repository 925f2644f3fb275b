"""The apps' contract (../shared/docs/swift-app-contract.md), the family-independent part: package and zip names,
and the types a model family (publisher.family) describes each model's inputs and outputs with. Conversion
produces it, layout and verification check against it."""

from __future__ import annotations

from dataclasses import dataclass

from publisher.vocabulary import Attention, Component

# Apple's Python pipeline opens Stable_Diffusion_version_<model version>_<submodule>.mlpackage
PACKAGE_TEMPLATE = "Stable_Diffusion_version_{model_version}_{submodule}.mlpackage"
TEXT_SEQUENCE_LENGTH = 77
UNET_BATCH = 2  # classifier-free guidance: unconditional + conditional
RESIDUAL_PREFIX = "additional_residual_"  # a ControlNet's outputs, the ControlledUnet's inputs (Apple's names)
SAFETY_CLIP_SIZE = 224
LATENT_CHANNELS = 4


def package_name(model_version: str, submodule: str) -> str:
    return PACKAGE_TEMPLATE.format(model_version=model_version, submodule=submodule)


def zip_folder_name(repo_name: str, attention: Attention | str) -> str:
    """The top folder of a variant's Resources zip (the demo app loads `<repo>_<attention>_compiled/`)."""
    folder = attention.folder if isinstance(attention, Attention) else attention
    return f"{repo_name}_{folder}_compiled"


def zip_file_name(repo_name: str, attention: Attention | str) -> str:
    return zip_folder_name(repo_name, attention) + ".zip"


# Apple's converter declares every model input float16 except the text encoder's token ids, and Apple's Python
# pipeline refuses a package whose declared input dtype differs from what it feeds; every output is float32.
FLOAT16 = "float16"
FLOAT32 = "float32"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    description: str
    dtype: str = FLOAT32


@dataclass(frozen=True)
class ModelSpec:
    """Names and shapes the apps use for one component (a chunked UNet's halves are described elsewhere)."""

    component: Component
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str
    # what the package computes in: float16, except where a model overflows it (the SDXL VAE: Apple converts it
    # in float32 and the Swift pipeline runs it on CPU and GPU)
    precision: str = FLOAT16


@dataclass(frozen=True)
class ModelDims:
    """The few model dimensions the contract's shapes depend on, read from the source's configs."""

    resolution: int
    text_hidden: int  # 768 for SD 1.x, 1024 for SD 2.x
    latent_channels: int = LATENT_CHANNELS
    unet_out_channels: int = LATENT_CHANNELS
    extra: tuple[tuple[str, int], ...] = ()  # a family's own dimensions, by name (SDXL: the pooled text size)

    def size(self, name: str) -> int:
        for key, value in self.extra:
            if key == name:
                return value
        raise KeyError(f"model dimension '{name}' was not read from the source")

    height: int = 0  # the image's height where it differs from its width (`resolution`)

    @property
    def image_height(self) -> int:
        return self.height or self.resolution

    @property
    def latent(self) -> int:
        """The latent's side (a square image's; `latent_height` / `latent_width` for any)."""
        if self.image_height != self.resolution:
            raise ValueError("a non-square size has no one latent side")
        return self.resolution // 8

    @property
    def latent_height(self) -> int:
        return self.image_height // 8

    @property
    def latent_width(self) -> int:
        return self.resolution // 8
