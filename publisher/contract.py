"""The apps' contract (../shared/docs/swift-app-contract.md) as data: file names, folder names, and each
model's input/output names and shapes. Conversion produces it, layout and verification check against it."""

from __future__ import annotations

from dataclasses import dataclass

from publisher.manifest import Attention, Component

# Apple's Python pipeline opens Stable_Diffusion_version_<model version>_<submodule>.mlpackage
PACKAGE_TEMPLATE = "Stable_Diffusion_version_{model_version}_{submodule}.mlpackage"
RESOURCE_NAMES = {
    "text_encoder": "TextEncoder",
    "unet": "Unet",
    "unet_chunk1": "UnetChunk1",
    "unet_chunk2": "UnetChunk2",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
    "safety_checker": "SafetyChecker",
}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
TEXT_SEQUENCE_LENGTH = 77
UNET_BATCH = 2  # classifier-free guidance: unconditional + conditional
SAFETY_CLIP_SIZE = 224
LATENT_CHANNELS = 4


# The attention implementation changes these components' graphs; the others (stock CLIP models) are converted once
# per source and shared by every attention's variant.
USES_ATTENTION = frozenset({Component.UNET, Component.VAE_DECODER, Component.VAE_ENCODER})
UNET_CHUNKS = ("unet_chunk1", "unet_chunk2")  # the chunked UNet's submodules, in the order the pipeline runs them
SUBMODULES = (*(c.value for c in Component), *UNET_CHUNKS)


def package_name(model_version: str, submodule: str) -> str:
    return PACKAGE_TEMPLATE.format(model_version=model_version, submodule=submodule)


def submodule_of_package(name: str, model_version: str) -> str | None:
    """The submodule a package folder name stands for (inverse of package_name), or None."""
    prefix, suffix = PACKAGE_TEMPLATE.split("{model_version}")[0], ".mlpackage"
    stem = name.removeprefix(f"{prefix}{model_version}_").removesuffix(suffix)
    return stem if stem in SUBMODULES and package_name(model_version, stem) == name else None


def component_of(submodule: str) -> Component:
    return Component.UNET if submodule in UNET_CHUNKS else Component(submodule)


def compiled_name(submodule: str) -> str:
    return f"{RESOURCE_NAMES[submodule]}.mlmodelc"


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


@dataclass(frozen=True)
class ModelDims:
    """The few model dimensions the contract's shapes depend on, read from the source's configs."""

    resolution: int
    text_hidden: int  # 768 for SD 1.x, 1024 for SD 2.x
    latent_channels: int = LATENT_CHANNELS
    unet_out_channels: int = LATENT_CHANNELS

    @property
    def latent(self) -> int:
        return self.resolution // 8


def model_spec(component: Component, dims: ModelDims) -> ModelSpec:
    latent, res, hidden, ch = dims.latent, dims.resolution, dims.text_hidden, dims.latent_channels
    if component is Component.TEXT_ENCODER:
        return ModelSpec(component, (
            TensorSpec("input_ids", (1, TEXT_SEQUENCE_LENGTH), "CLIP token ids of the prompt", FLOAT32),
        ), (
            TensorSpec("last_hidden_state", (1, TEXT_SEQUENCE_LENGTH, hidden), "per-token text embeddings"),
            TensorSpec("pooled_outputs", (1, hidden), "embedding at the end-of-text token"),
        ), "CLIP text encoder")
    if component is Component.UNET:
        return ModelSpec(component, (
            TensorSpec("sample", (UNET_BATCH, ch, latent, latent), "noisy latents", FLOAT16),
            TensorSpec("timestep", (UNET_BATCH,), "diffusion timestep", FLOAT16),
            TensorSpec("encoder_hidden_states", (UNET_BATCH, hidden, 1, TEXT_SEQUENCE_LENGTH),
                       "text embeddings as (B, C, 1, S)", FLOAT16),
        ), (
            TensorSpec("noise_pred", (UNET_BATCH, dims.unet_out_channels, latent, latent), "predicted noise"),
        ), "denoising UNet")
    if component is Component.VAE_DECODER:
        return ModelSpec(component, (
            TensorSpec("z", (1, ch, latent, latent), "latents (already divided by the VAE scaling factor)", FLOAT16),
        ), (
            TensorSpec("image", (1, 3, res, res), "decoded image in [-1, 1]"),
        ), "VAE decoder")
    if component is Component.VAE_ENCODER:
        return ModelSpec(component, (
            TensorSpec("x", (1, 3, res, res), "image in [-1, 1]", FLOAT16),
        ), (
            TensorSpec("latent", (1, 2 * ch, latent, latent), "mean and log-variance of the latent distribution"),
        ), "VAE encoder")
    if component is Component.SAFETY_CHECKER:
        return ModelSpec(component, (
            TensorSpec("clip_input", (1, 3, SAFETY_CLIP_SIZE, SAFETY_CLIP_SIZE), "CLIP-preprocessed image", FLOAT16),
            TensorSpec("images", (1, res, res, 3), "the generated image, NHWC", FLOAT16),
            TensorSpec("adjustment", (1,), "added to the special-care scores (0 by default; higher flags more)",
                       FLOAT16),
        ), (
            TensorSpec("filtered_images", (1, res, res, 3), "images, blacked out where a concept was found"),
            TensorSpec("has_nsfw_concepts", (1, 1, 1, 1), "1 where a concept was found"),
            TensorSpec("concept_scores", (1, 17), "per-concept score; > 0 means found"),
        ), "safety checker")
    raise ValueError(component)
