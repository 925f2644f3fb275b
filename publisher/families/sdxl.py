"""Stable Diffusion XL (StableDiffusionXLPipeline): two text encoders, the micro-conditioned UNet (two chunks for
iOS), VAE decoder and encoder; no safety checker. Names, shapes and dtypes as Apple's SDXL pipelines read them:

- `TextEncoder` (CLIP ViT-L) and `TextEncoder2` (OpenCLIP bigG with projection) take float32 `input_ids` and
  return `hidden_embeds` (the hidden states before the last layer) and `pooled_outputs`; the Swift pipeline
  concatenates the two hidden states on the channel axis and uses the second encoder's pooled output.
- `Unet` (and `UnetRefiner`, the refiner pipeline's UNet, from `source.refiner`) adds `time_ids` (the image
  geometry: original size, crop offsets, target size; 6 values per batch row, 5 for the refiner: the aesthetic
  score replaces the target size) and `text_embeds` (the pooled text embedding), float16 like the other inputs.
- `ControlledUnet` (the UNet with `additional_residual_0..N` after its own inputs, Apple's SD layout) and
  ControlNets (`ControlNet_<org>_<name>.mlpackage`: the UNet's inputs, then `controlnet_cond`) where a manifest asks
  for them. Apple's converter makes neither for SDXL and its Swift XL pipeline loads no ControlNet today: they follow
  Apple's SD names and conventions, for apps that run them.
- The VAE overflows in float16: Apple converts it in float32 with float32 inputs and the Swift pipeline runs it on
  CPU and GPU. A VAE whose config says it need not be upcast (`force_upcast: false`, as the fp16-fixed SDXL VAE
  says) is converted in float16 like SD's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from publisher.contract import FLOAT16, FLOAT32, LATENT_CHANNELS, UNET_BATCH, ModelDims, ModelSpec, TensorSpec
from publisher.errors import SourceError
from publisher.families.sd import FAMILY as SD
from publisher.families.sd import config_int, controlnet_spec, residual_dims, sd_model_spec
from publisher.family import ComponentSpec, ModelFamily, read_config
from publisher.vocabulary import Component

BASE_TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)
REFINER_TIME_IDS = 5  # original (h, w), crop top-left (y, x), aesthetic score
# Apple's package and resource names for the refiner and its chunks
REFINER_CHUNKS = (("refiner_chunk1", "UnetRefinerChunk1"), ("refiner_chunk2", "UnetRefinerChunk2"))


def _int(config: dict[str, object], key: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SourceError(f"{where}: '{key}' is missing or not an integer")
    return value


def _cross_attention_dim(config: dict[str, object]) -> object:
    value = config.get("cross_attention_dim")
    return value[0] if isinstance(value, list) else value


def _pooled(config: dict[str, object], time_ids: int, where: str) -> int:
    """The pooled text size a UNet's add-embedding takes besides its `time_ids` geometry embeddings."""
    return _int(config, "projection_class_embeddings_input_dim", where) - \
        time_ids * _int(config, "addition_time_embed_dim", where)


def _model_index(source: Path) -> dict[str, object]:
    path = Path(source) / "model_index.json"
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except ValueError as exc:
        raise SourceError(f"{path}: not JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def sdxl_dims(source: Path, resolution: int) -> ModelDims:
    """Sizes from the source's configs: the UNet's cross-attention width, the pooled text size (what the
    add-embedding takes besides the geometry embeddings), each text encoder's width and sequence length."""
    extra: dict[str, int] = {}
    unet = read_config(source, "unet")
    index = _model_index(source)
    if unet is not None:
        where = f"{source}/unet/config.json"
        ids = REFINER_TIME_IDS if index.get("requires_aesthetics_score") else BASE_TIME_IDS
        extra |= {"time_ids": ids, "pooled": _pooled(unet, ids, where)} | dict(residual_dims(unet))
        hidden = _cross_attention_dim(unet)
    else:
        hidden = None
    for folder in ("text_encoder", "text_encoder_2"):
        config = read_config(source, folder)
        if config is not None:
            where = f"{source}/{folder}/config.json"
            extra[f"{folder}.hidden"] = _int(config, "hidden_size", where)
            extra[f"{folder}.length"] = _int(config, "max_position_embeddings", where)
            if folder == "text_encoder_2":
                extra.setdefault("pooled", _int(config, "projection_dim", where))
    refiner = read_config(source, "refiner")
    if refiner is not None:  # the refiner's geometry always has the aesthetic score (Apple's refinerGeometry)
        where = f"{source}/refiner/config.json"
        extra |= {"refiner.hidden": _int({"cross_attention_dim": _cross_attention_dim(refiner)},
                                         "cross_attention_dim", where),
                  "refiner.time_ids": REFINER_TIME_IDS, "refiner.pooled": _pooled(refiner, REFINER_TIME_IDS, where)}
    vae = read_config(source, "vae")
    if vae is not None:
        extra["vae.float32"] = int(vae.get("force_upcast", True) is not False)
    if hidden is None:
        hidden = extra.get("text_encoder.hidden", 0) + extra.get("text_encoder_2.hidden", 0)
    if not isinstance(hidden, int) or hidden <= 0:
        raise SourceError(f"{source}: cannot tell the text embedding size (no unet/ or text encoder configs)")
    latent = config_int((unet or {}).get("in_channels", LATENT_CHANNELS))
    out = config_int((unet or {}).get("out_channels", LATENT_CHANNELS))
    return ModelDims(resolution=resolution, text_hidden=hidden, latent_channels=latent, unet_out_channels=out,
                     extra=tuple(sorted(extra.items())))


def _sequence(dims: ModelDims) -> int:
    for name in ("text_encoder.length", "text_encoder_2.length"):
        try:
            return dims.size(name)
        except KeyError:
            continue
    return 77


def sdxl_model_spec(component: Component, dims: ModelDims) -> ModelSpec:
    latent, ch, seq = (dims.latent_height, dims.latent_width), dims.latent_channels, _sequence(dims)
    if component in (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2):
        folder = component.value
        hidden = dims.size(f"{folder}.hidden")
        pooled = dims.size("pooled") if component == Component.TEXT_ENCODER_2 else hidden
        name = "OpenCLIP bigG text encoder (with projection)" if component == Component.TEXT_ENCODER_2 \
            else "CLIP text encoder"
        return ModelSpec(component, (
            TensorSpec("input_ids", (1, seq), "token ids of the prompt", FLOAT32),
        ), (
            TensorSpec("hidden_embeds", (1, seq, hidden), "hidden states before the last encoder layer"),
            TensorSpec("pooled_outputs", (1, pooled), "pooled (projected) text embedding"),
        ), name)
    if component in (Component.UNET, Component.REFINER):
        refiner = component == Component.REFINER
        hidden = dims.size("refiner.hidden") if refiner else dims.text_hidden
        context = "the second text encoder's hidden states" if refiner else \
            "both text encoders' hidden states, concatenated"
        return ModelSpec(component, (
            TensorSpec("sample", (UNET_BATCH, ch, *latent), "noisy latents", FLOAT16),
            TensorSpec("timestep", (UNET_BATCH,), "diffusion timestep", FLOAT16),
            TensorSpec("encoder_hidden_states", (UNET_BATCH, hidden, 1, seq), f"{context}, as (B, C, 1, S)",
                       FLOAT16),
            TensorSpec("time_ids", (UNET_BATCH, dims.size("refiner.time_ids" if refiner else "time_ids")),
                       "image geometry: original size, crop top-left, then the aesthetic score (refiner) or the "
                       "target size", FLOAT16),
            TensorSpec("text_embeds", (UNET_BATCH, dims.size("refiner.pooled" if refiner else "pooled")),
                       "pooled text embedding of the second text encoder", FLOAT16),
        ), (
            TensorSpec("noise_pred", (UNET_BATCH, dims.unet_out_channels, *latent), "predicted noise"),
        ), "refiner UNet (SDXL)" if refiner else "denoising UNet (SDXL)")
    if component == Component.CONTROL_UNET or component == Component.CONTROLNET \
            or component.startswith(f"{Component.CONTROLNET}-"):  # SD's rule on SDXL's UNet inputs
        return controlnet_spec(component, sdxl_model_spec(Component.UNET, dims), dims)
    if component in (Component.VAE_DECODER, Component.VAE_ENCODER):  # SD's, in float32 unless the VAE need not be
        spec = sd_model_spec(component, dims)
        if not dict(dims.extra).get("vae.float32", 1):
            return spec
        return replace(spec, inputs=tuple(replace(t, dtype=FLOAT32) for t in spec.inputs), precision=FLOAT32)
    raise ValueError(component)


# SD's components where SDXL's are the same models; its UNet is 2.57 B parameters: over 1 GB down to 3 bits
_UNET = replace(SD.component(Component.UNET), chunk_above_bits=3)
FAMILY = ModelFamily(
    name="sdxl",
    description="Stable Diffusion XL",
    components=(
        replace(SD.component(Component.TEXT_ENCODER), wrapper="text_encoder_xl"),
        ComponentSpec(Component.TEXT_ENCODER_2, "text_encoder_2", "TextEncoder2",
                      "transformers:CLIPTextModelWithProjection", "text_encoder_xl", compressible=True),
        _UNET,
        replace(_UNET, component=Component.REFINER, folder="refiner", resource="UnetRefiner", chunks=REFINER_CHUNKS,
                source_role="refiner", source_folder="unet"),
        replace(SD.component(Component.CONTROL_UNET), chunk_above_bits=_UNET.chunk_above_bits),
        SD.component(Component.VAE_DECODER),
        SD.component(Component.VAE_ENCODER),
    ),
    model_spec=sdxl_model_spec,
    read_dims=sdxl_dims,
    swift_pipeline="StableDiffusionXLPipeline",
    diffusers_pipeline="diffusers:StableDiffusionXLPipeline",
    controlnet=SD.controlnet,
)
