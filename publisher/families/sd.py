"""Stable Diffusion 1.x / 2.x (StableDiffusionPipeline): CLIP text encoder, UNet (two chunks for iOS), VAE decoder
and encoder, safety checker; names, shapes and dtypes as Apple's Swift and Python pipelines use them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from publisher.contract import (
    FLOAT16,
    FLOAT32,
    LATENT_CHANNELS,
    RESIDUAL_PREFIX,
    SAFETY_CLIP_SIZE,
    TEXT_SEQUENCE_LENGTH,
    UNET_BATCH,
    ModelDims,
    ModelSpec,
    TensorSpec,
)
from publisher.errors import SourceError
from publisher.family import ComponentSpec, ModelFamily, read_config
from publisher.vocabulary import Component

# The Swift pipeline feeds the safety checker a (1, 512, 512, 3) image whatever the model's resolution.
SAFETY_CHECKER_RESOLUTION = 512
UNET_CHUNKS = (("unet_chunk1", "UnetChunk1"), ("unet_chunk2", "UnetChunk2"))
# Apple's converter: `..._control-unet_chunk1.mlpackage`, compiled ControlledUnetChunk1.mlmodelc
CONTROLLED_UNET_CHUNKS = (("control-unet_chunk1", "ControlledUnetChunk1"), ("control-unet_chunk2", "ControlledUnetChunk2"))


def sd_model_spec(component: Component, dims: ModelDims) -> ModelSpec:
    # (height, width) of the latents and of the image
    latent, res, hidden, ch = (dims.latent_height, dims.latent_width), (dims.image_height, dims.resolution), \
        dims.text_hidden, dims.latent_channels
    if component == Component.TEXT_ENCODER:
        return ModelSpec(component, (
            TensorSpec("input_ids", (1, TEXT_SEQUENCE_LENGTH), "CLIP token ids of the prompt", FLOAT32),
        ), (
            TensorSpec("last_hidden_state", (1, TEXT_SEQUENCE_LENGTH, hidden), "per-token text embeddings"),
            TensorSpec("pooled_outputs", (1, hidden), "embedding at the end-of-text token"),
        ), "CLIP text encoder")
    if component == Component.UNET:
        return ModelSpec(component, (
            TensorSpec("sample", (UNET_BATCH, ch, *latent), "noisy latents", FLOAT16),
            TensorSpec("timestep", (UNET_BATCH,), "diffusion timestep", FLOAT16),
            TensorSpec("encoder_hidden_states", (UNET_BATCH, hidden, 1, TEXT_SEQUENCE_LENGTH),
                       "text embeddings as (B, C, 1, S)", FLOAT16),
        ), (
            TensorSpec("noise_pred", (UNET_BATCH, dims.unet_out_channels, *latent), "predicted noise"),
        ), "denoising UNet")
    if component == Component.CONTROL_UNET or component == Component.CONTROLNET \
            or component.startswith(f"{Component.CONTROLNET}-"):
        return controlnet_spec(component, sd_model_spec(Component.UNET, dims), dims)
    if component == Component.VAE_DECODER:
        return ModelSpec(component, (
            TensorSpec("z", (1, ch, *latent), "latents (already divided by the VAE scaling factor)", FLOAT16),
        ), (
            TensorSpec("image", (1, 3, *res), "decoded image in [-1, 1]"),
        ), "VAE decoder")
    if component == Component.VAE_ENCODER:
        return ModelSpec(component, (
            TensorSpec("x", (1, 3, *res), "image in [-1, 1]", FLOAT16),
        ), (
            TensorSpec("latent", (1, 2 * ch, *latent), "mean and log-variance of the latent distribution"),
        ), "VAE encoder")
    if component == Component.SAFETY_CHECKER:
        return ModelSpec(component, (
            TensorSpec("clip_input", (1, 3, SAFETY_CLIP_SIZE, SAFETY_CLIP_SIZE), "CLIP-preprocessed image", FLOAT16),
            TensorSpec("images", (1, *res, 3), "the generated image, NHWC", FLOAT16),
            TensorSpec("adjustment", (1,), "added to the special-care scores (0 by default; higher flags more)",
                       FLOAT16),
        ), (
            TensorSpec("filtered_images", (1, *res, 3), "images, blacked out where a concept was found"),
            TensorSpec("has_nsfw_concepts", (1, 1, 1, 1), "1 where a concept was found"),
            TensorSpec("concept_scores", (1, 17), "per-concept score; > 0 means found"),
        ), "safety checker")
    raise ValueError(component)


def controlnet_spec(component: Component, unet: ModelSpec, dims: ModelDims) -> ModelSpec:
    """Apple's ControlledUnet (the UNet's inputs, then the residuals) or a ControlNet (the UNet's inputs, then the
    condition image; the residuals out, float32 as every output), from the family's UNet spec."""
    if component == Component.CONTROL_UNET:
        return replace(unet, component=component, inputs=unet.inputs + controlnet_residuals(dims),
                       description=f"{unet.description} taking a ControlNet's residuals (Apple's ControlledUnet)")
    size = (dims.image_height, dims.resolution)
    return ModelSpec(component, unet.inputs + (
        TensorSpec("controlnet_cond", (UNET_BATCH, 3, *size), "the condition image (edges, depth, ...) in [0, 1]",
                   FLOAT16),
    ), tuple(replace(residual, dtype=FLOAT32) for residual in controlnet_residuals(dims)),
        "ControlNet: the residuals a condition image adds to the ControlledUnet")


def controlnet_residuals(dims: ModelDims) -> tuple[TensorSpec, ...]:
    """A ControlNet's outputs as the ControlledUnet takes them (Apple's `additional_residual_<i>`): one per skip
    connection of the down blocks, then the middle block's, each (2, C, H/8/2^level, W/8/2^level)."""
    return tuple(TensorSpec(f"{RESIDUAL_PREFIX}{i}", (UNET_BATCH, dims.size(f"residual{i}.channels"),
                                                         dims.latent_height >> dims.size(f"residual{i}.level"),
                                                         dims.latent_width >> dims.size(f"residual{i}.level")),
                            "ControlNet residual" + (" (middle block)" if i == dims.size("residuals") - 1 else ""),
                            FLOAT16)
                 for i in range(dims.size("residuals")))


def residual_dims(unet: dict[str, object]) -> tuple[tuple[str, int], ...]:
    """The shapes of a ControlNet's residuals for a UNet config: channels and down-sampling level of each skip
    connection (conv_in, every down-block resnet, every down-sampler) and of the middle block's output."""
    channels = unet.get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        return ()
    widths = [config_int(c) for c in channels]
    per_block = unet.get("layers_per_block", 2)
    layers = [config_int(n) for n in per_block] if isinstance(per_block, list) else [config_int(per_block)] * len(widths)
    found = [(widths[0], 0)]
    for block, width in enumerate(widths):
        found += [(width, block)] * layers[block]
        if block < len(widths) - 1:
            found.append((width, block + 1))
    found.append((widths[-1], len(widths) - 1))
    return (("residuals", len(found)), *((f"residual{i}.{key}", value) for i, (c, level) in enumerate(found)
                                         for key, value in (("channels", c), ("level", level))))


def sd_dims(source: Path, resolution: int) -> ModelDims:
    """The dimensions the contract's shapes depend on, from the source's configs."""
    hidden = None
    for folder, key in (("unet", "cross_attention_dim"), ("text_encoder", "hidden_size")):
        config = read_config(source, folder)
        if config is not None:
            value = config.get(key)
            hidden = value[0] if isinstance(value, list) else value
            break
    if not isinstance(hidden, int):
        raise SourceError(f"{source}: cannot tell the text embedding size (no unet/ or text_encoder/ config)")
    unet = read_config(source, "unet") or {}
    latent, out = unet.get("in_channels", LATENT_CHANNELS), unet.get("out_channels", LATENT_CHANNELS)
    return ModelDims(resolution=resolution, text_hidden=hidden, latent_channels=config_int(latent),
                     unet_out_channels=config_int(out), extra=residual_dims(unet))


def config_int(value: object) -> int:
    """A config's integer (checked: a config is the source repo's, untrusted)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SourceError(f"expected an integer in the UNet config, not {value!r}")
    return int(value)


FAMILY = ModelFamily(
    name="sd",
    description="Stable Diffusion 1.x/2.x",
    components=(
        ComponentSpec(Component.TEXT_ENCODER, "text_encoder", "TextEncoder", "transformers:CLIPTextModel",
                      "text_encoder", compressible=True),
        ComponentSpec(Component.UNET, "unet", "Unet", "diffusers:UNet2DConditionModel", "unet",
                      uses_attention=True, sized=True, compressible=True, chunks=UNET_CHUNKS, chunk_above_bits=6),
        # Apple's ControlledUnet: built where a publish entry asks for it (`controlnet`), beside the Unet; the Swift
        # pipeline takes it when ControlNets are named
        ComponentSpec(Component.CONTROL_UNET, "unet", "ControlledUnet", "diffusers:UNet2DConditionModel",
                      "controlled_unet", uses_attention=True, sized=True, compressible=True, optional=True,
                      same_weights_as="unet", chunks=CONTROLLED_UNET_CHUNKS, chunk_above_bits=6),
        ComponentSpec(Component.VAE_DECODER, "vae", "VAEDecoder", "diffusers:AutoencoderKL", "vae_decoder",
                      sized=True),
        ComponentSpec(Component.VAE_ENCODER, "vae", "VAEEncoder", "diffusers:AutoencoderKL", "vae_encoder",
                      sized=True),
        ComponentSpec(Component.SAFETY_CHECKER, "safety_checker", "SafetyChecker",
                      "diffusers.pipelines.stable_diffusion.safety_checker:StableDiffusionSafetyChecker",
                      "safety_checker", resolution=SAFETY_CHECKER_RESOLUTION, in_checkpoint=False),
    ),
    model_spec=sd_model_spec,
    read_dims=sd_dims,
    # each ControlNet a manifest lists (`controlnets`), from its own repo's root (or `controlnet/`), converted per
    # attention and size like the UNet and compressed like it; Apple's converter leaves them whole (no chunks)
    controlnet=ComponentSpec(Component.CONTROLNET, "controlnet", "controlnet", "diffusers:ControlNetModel",
                             "controlnet", uses_attention=True, sized=True, compressible=True, optional=True,
                             source_role="controlnet", source_folder="controlnet", in_checkpoint=False),
    coreai=True,
)
