"""A ControlNet in the Neural Engine's layout, with Apple's interface.

A diffusers `ControlNetModel` is the UNet's encoder half (conv_in, time embedding, down blocks, middle block) plus
an embedding of the condition image added after conv_in and one 1x1 "zero" convolution per skip connection and for
the middle block. It runs here on the ANE-shaped UNet's stages (publisher.convert.unet), so every attention
implementation and graph rule of the UNet applies to it unchanged. Its outputs are the residuals the ControlledUnet
takes, `additional_residual_0..N` (Apple's names), in diffusers' order: the skip connections, then the middle block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from publisher.convert.attention import attention_core
from publisher.convert.unet import AneUnet
from publisher.errors import SourceError
from publisher.vocabulary import Attention

# the config keys that fix a ControlNet's interface with its UNet: its residuals (their number, widths and levels),
# what it attends to and the added conditioning it takes (SDXL's pooled text and geometry). A ControlNet trained for
# another base differs in one of them; one with fewer transformer layers or other block kinds than its base (the
# "small" SDXL ControlNets) does not, and fits.
_BASE_KEYS = ("in_channels", "cross_attention_dim", "block_out_channels", "layers_per_block", "addition_embed_type",
              "projection_class_embeddings_input_dim", "addition_time_embed_dim")


def base_mismatch(unet: dict[str, Any], controlnet: dict[str, Any]) -> str | None:
    """Why a ControlNet's config does not fit a UNet's (None when it does)."""
    for key in _BASE_KEYS:
        ours, theirs = controlnet.get(key), unet.get(key)
        if isinstance(ours, list | tuple) and isinstance(theirs, list | tuple):
            ours, theirs = list(ours), list(theirs)
        if key == "layers_per_block" and ours != theirs:  # an int means the same for every block
            blocks = len(unet.get("block_out_channels") or ())
            ours, theirs = ([v] * blocks if isinstance(v, int) else v for v in (ours, theirs))
        if key == "cross_attention_dim" and isinstance(theirs, list) and not isinstance(ours, list):
            ours = [ours] * len(theirs)
        if ours != theirs:
            return f"its {key} {ours!r} is not the base UNet's {theirs!r}"
    return None


def check_fits(unet: dict[str, Any], controlnet: dict[str, Any], label: str) -> None:
    problem = base_mismatch(unet, controlnet)
    if problem is not None:
        raise SourceError(f"ControlNet {label} was trained for another base model: {problem}")


class ControlNet(nn.Module):
    """forward(sample (2, 4, h, w), timestep (2,), encoder_hidden_states (2, C, 1, 77)[, time_ids, text_embeds],
    controlnet_cond (2, 3, H, W) in [0, 1]): the UNet's inputs, then the condition image (as the ControlledUnet
    takes the UNet's, then the residuals) -> the residuals, as diffusers' ControlNetModel computes them at
    conditioning scale 1 (the Swift pipeline applies none). SDXL's time_ids and text_embeds feed its added
    embedding as they feed the UNet's."""

    def __init__(self, controlnet: Any, attention: Attention) -> None:
        super().__init__()
        self.net = AneUnet(controlnet, attention_core(attention))
        self.controlnet = controlnet
        order = controlnet.config.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise SourceError(f"unknown controlnet_conditioning_channel_order {order!r}")
        self.bgr = order == "bgr"
        self.pooled = bool(controlnet.config.get("global_pool_conditions", False))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net, model = self.net, self.controlnet
        *conditioning, controlnet_cond = rest
        state = net.start(sample, timestep, encoder_hidden_states, *conditioning)
        condition = controlnet_cond.flip(1) if self.bgr else controlnet_cond
        state.hidden = model.conv_in(sample) + model.controlnet_cond_embedding(condition)
        state.skips = [state.hidden]
        net.run(state, 1)  # stage 0 is conv_in, done above with the condition added
        residuals = [block(skip) for block, skip in zip(model.controlnet_down_blocks, state.skips, strict=True)]
        residuals.append(model.controlnet_mid_block(state.hidden))
        if self.pooled:  # "shuffle"-style ControlNets: one value per channel
            residuals = [r.mean(dim=(2, 3), keepdim=True).expand_as(r) for r in residuals]
        return tuple(residuals)
