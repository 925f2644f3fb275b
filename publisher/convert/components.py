"""Per-component wrappers: load the diffusers/transformers module, give it the contract's inputs and outputs.

Each wrapper takes float32 inputs in the shapes of publisher.contract and returns outputs in the contract's
order. `load_component` builds the PyTorch reference (attention rewritten as asked) that conversion traces and
verification compares against.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from publisher.contract import FLOAT16, ModelDims, ModelSpec
from publisher.convert.attention import attention_core
from publisher.convert.controlnet import ControlNet, check_fits
from publisher.convert.unet import AneUnet
from publisher.convert.weight_files import load_streaming, weights_variant
from publisher.errors import SourceError
from publisher.family import DEFAULT_FAMILY, ModelFamily, family_named, read_config
from publisher.vocabulary import Attention, Component, Resolution

_LOAD = {"torch_dtype": torch.float32, "low_cpu_mem_usage": False}


# A model as diffusers or transformers loaded it, read by its attributes (typed Any: nn.Module types every attribute
# `Tensor | Module`, which says nothing about the library's models).
Loaded = Any


class TextEncoder(nn.Module):
    def __init__(self, text_model: Loaded) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_model(input_ids.to(torch.int32), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class TextEncoderXL(nn.Module):
    """SDXL's text encoders: the hidden states before the last encoder layer, and the pooled embedding (the
    projected `text_embeds` where the model has a projection, as OpenCLIP bigG has; else the pooler output)."""

    def __init__(self, text_model: Loaded) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_model(input_ids.to(torch.int32), output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        return out.hidden_states[-2], pooled


class Unet(nn.Module):
    """The ANE-shaped UNet (publisher.convert.unet) for every attention implementation; encoder_hidden_states
    arrive as (B, C, 1, S), the Swift pipeline's layout, and are consumed as they are."""

    def __init__(self, unet: Loaded, attention: Attention) -> None:
        super().__init__()
        self.unet = AneUnet(unet, attention_core(attention))
        self.attention = attention

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *conditioning: torch.Tensor) -> torch.Tensor:
        # conditioning: SDXL's time_ids and text_embeds, in the contract's input order
        return self.unet(sample, timestep, encoder_hidden_states, *conditioning)


class ControlledUnet(Unet):
    """Apple's `ControlledUnet`: the UNet with a ControlNet's residuals as inputs (`additional_residual_0..N`, after
    the UNet's own inputs), added where diffusers adds `down_block_additional_residuals` and
    `mid_block_additional_residual`."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        conditioning = 2 if self.unet.conditioned else 0  # SDXL's time_ids and text_embeds come first
        return self.unet(sample, timestep, encoder_hidden_states, *rest[:conditioning],
                         residuals=tuple(rest[conditioning:]))


class VAEDecoder(nn.Module):
    def __init__(self, vae: Loaded) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class VAEEncoder(nn.Module):
    def __init__(self, vae: Loaded) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))


class SafetyChecker(nn.Module):
    """Traceable safety checker: the concept-score rule of diffusers' checker, tensors only (no numpy, no loops).

    As Apple's converted checker: `adjustment` is added to the special-care scores only; score_i = cos(image
    embedding, concept_i) - threshold_i (+ 0.01 for every concept once any special-care score is > 0); an image is
    flagged when any score is > 0 (`has_nsfw_concepts` shaped (B, 1, 1, 1)) and a flagged image is blacked out.
    """

    def __init__(self, checker: Loaded) -> None:
        super().__init__()
        self.vision_model = checker.vision_model
        self.visual_projection = checker.visual_projection
        self.concept_embeds: torch.Tensor = checker.concept_embeds
        self.special_care_embeds: torch.Tensor = checker.special_care_embeds
        self.concept_embeds_weights: torch.Tensor = checker.concept_embeds_weights
        self.special_care_embeds_weights: torch.Tensor = checker.special_care_embeds_weights

    @staticmethod
    def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        return a @ b.T

    def forward(self, clip_input: torch.Tensor, images: torch.Tensor,
                adjustment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = self.vision_model(clip_input)[1]
        embeds = self.visual_projection(pooled)
        special = self._cosine(embeds, self.special_care_embeds) - self.special_care_embeds_weights + adjustment
        special_found = (special > 0).any(dim=1, keepdim=True).to(embeds.dtype)
        scores = self._cosine(embeds, self.concept_embeds) - self.concept_embeds_weights
        scores = scores + special_found * 0.01
        has_nsfw = (scores > 0).any(dim=1).to(embeds.dtype)[:, None, None, None]
        return images * (1.0 - has_nsfw), has_nsfw, scores


@dataclass
class LoadedComponent:
    module: nn.Module
    spec: ModelSpec
    dims: ModelDims


def source_dims(source: Path, resolution: Resolution, family: str = DEFAULT_FAMILY) -> ModelDims:
    """The dimensions the contract's shapes depend on, as the family reads them from the source's configs."""
    return family_named(family).dims(source, resolution)


def check_component_present(source: Path, component: Component, label: str, family: ModelFamily) -> None:
    folder = family.component(component).folder
    if not (Path(source) / folder / "config.json").exists():
        raise SourceError(f"source {label} has no {component.value} (folder {folder}/ with a config.json is "
                          "missing); drop it from the manifest's components")


# The wrappers a family's components name (ComponentSpec.wrapper): the loaded module -> the contract's interface.
WRAPPERS: dict[str, Callable[[nn.Module, Attention], nn.Module]] = {
    "text_encoder": lambda module, attention: TextEncoder(module),
    "text_encoder_xl": lambda module, attention: TextEncoderXL(module),
    "unet": lambda module, attention: Unet(module, attention),
    "controlled_unet": lambda module, attention: ControlledUnet(module, attention),
    "controlnet": lambda module, attention: ControlNet(module, attention),
    # the VAE as diffusers has it, whatever the attention implementation: Apple's converter traces it unchanged
    # ("a pure ConvNet"), so its packages are one conversion shared by every attention folder
    "vae_decoder": lambda module, attention: VAEDecoder(module),
    "vae_encoder": lambda module, attention: VAEEncoder(module),
    "safety_checker": lambda module, attention: SafetyChecker(module),
}


def _loader(spec: str) -> Any:
    """`module:Class` -> the class (the libraries are imported only when a component is loaded)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def load_component(source: Path, component: Component, attention: Attention, resolution: Resolution,
                   label: str | None = None, family: str = DEFAULT_FAMILY) -> LoadedComponent:
    """The PyTorch module for one component in float32 eval mode, attention rewritten, contract spec attached."""
    model_family = family_named(family)
    spec = model_family.component(component)
    check_component_present(source, component, label or str(source), model_family)
    dims = model_family.dims(source, resolution)
    folder = Path(source) / spec.folder
    if model_family.is_controlnet(component):  # before its weights cost anything
        check_fits(read_config(source, "unet") or {}, read_config(source, spec.folder) or {}, label or str(source))
    # float32 modules whatever the stored copy (fp16 weights are widened on load: the trace runs in float32). A
    # diffusers model with safetensors weights is streamed in (no random-init model, no second copy of the weights);
    # anything else goes through the library's own loader.
    cls = _loader(spec.loader)
    loaded = load_streaming(cls, folder) or cls.from_pretrained(folder, **_LOAD, variant=weights_variant(folder))
    module = WRAPPERS[spec.wrapper](loaded, attention)
    return LoadedComponent(module=module.eval().float(), spec=model_family.model_spec(component, dims), dims=dims)


def example_inputs(spec: ModelSpec, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs in the contract's shapes and value ranges, float32 tensors holding values the
    declared input dtype represents exactly (float16 inputs are rounded to float16), so that PyTorch and the
    package see the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for tensor in spec.inputs:
        if tensor.name == "input_ids":
            ids = torch.randint(0, 500, tensor.shape, generator=generator)
            ids[:, -1] = ids.max() + 1  # an end-of-text token with the largest id
            values = ids.to(torch.float32)
        elif tensor.name == "timestep":
            values = torch.randint(1, 999, tensor.shape, generator=generator).to(torch.float32)
        elif tensor.name == "time_ids":  # image sizes and crop offsets in pixels (an aesthetic score: 2.5 / 6)
            values = torch.randint(0, 1025, tensor.shape, generator=generator).to(torch.float32)
        elif tensor.name == "adjustment":
            values = torch.zeros(tensor.shape)
        elif tensor.name in ("x", "images", "clip_input"):
            values = torch.rand(tensor.shape, generator=generator) * 2 - 1
        elif tensor.name == "controlnet_cond":  # a condition image, as the pipelines feed it: [0, 1]
            values = torch.rand(tensor.shape, generator=generator)
        else:
            values = torch.randn(tensor.shape, generator=generator)
        if tensor.dtype == FLOAT16:
            values = values.half().float()
        tensors.append(values)
    return tuple(tensors)


