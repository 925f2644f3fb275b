"""The UNet in the Neural Engine's layout, for every attention implementation.

Written from the published description of Apple's ANE-shaped UNet: activations stay 4-D, attention runs on
(B, C, 1, S), every linear layer (attention projections, feed-forward, time embedding, the resnets' time
projections, SD 2.x's proj_in/proj_out) is a 1x1 convolution, LayerNorm normalises over the channel axis. The
three attention implementations differ only in the attention core (publisher.convert.attention).

The module is built around a loaded diffusers `UNet2DConditionModel`: each `nn.Linear` becomes a `Conv1x1` whose
weight is a (out, in, 1, 1) view of the same storage (no copy of the weights), and a diffusers state dict loads
into it unchanged (2-D linear weights are reshaped at load). Its forward is a flat list of stages over one state
(hidden states, time embedding, skip connections), so the UNet can be cut between any two stages: the chunked
UNet (publisher.convert.chunk) cuts where the weight bytes split in half.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from publisher.convert.attention import AttentionCore, channel_layer_norm, linears_to_convs

# A diffusers block read by its attributes. Typed as Any: nn.Module types every attribute `Tensor | Module`, which
# says nothing about diffusers' blocks (their submodules, configs and flags).
Block = Any


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"the ANE-shaped UNet supports SD 1.x/2.x and SDXL UNets; this one has {what}")


def _check_config(unet: Block) -> None:
    config = unet.config
    for key in ("class_embed_type", "time_cond_proj_dim", "encoder_hid_dim", "time_embedding_act_fn"):
        if config.get(key) is not None:
            raise _unsupported(f"{key}={config.get(key)!r}")
    if config.get("addition_embed_type") not in (None, "text_time"):  # text_time: SDXL's micro-conditioning
        raise _unsupported(f"addition_embed_type={config.get('addition_embed_type')!r}")
    for resnet in (m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"):
        if resnet.time_embedding_norm != "default" or resnet.upsample is not None or resnet.downsample is not None:
            raise _unsupported("resnets with scale-shift norms or built-in resampling")
    for block in (m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"):
        if block.norm_type != "layer_norm" or getattr(block, "pos_embed", None) is not None:
            raise _unsupported(f"transformer blocks with norm_type {block.norm_type!r}")


# -- the building blocks, on 4-D tensors ---------------------------------------------------------------------

def resnet_forward(resnet: Block, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """diffusers' ResnetBlock2D with the time embedding as (B, C, 1, 1) and its projection a 1x1 conv."""
    h = resnet.conv1(resnet.nonlinearity(resnet.norm1(x)))
    if resnet.time_emb_proj is not None:
        h = h + resnet.time_emb_proj(emb if resnet.skip_time_act else resnet.nonlinearity(emb))
    h = resnet.conv2(resnet.dropout(resnet.nonlinearity(resnet.norm2(h))))
    if resnet.conv_shortcut is not None:
        x = resnet.conv_shortcut(x)
    return (x + h) / resnet.output_scale_factor


def attention_forward(attn: Block, x: torch.Tensor, context: torch.Tensor, core: AttentionCore) -> torch.Tensor:
    """A diffusers `Attention` on (B, C, 1, S) queries and (B, C', 1, S') keys/values."""
    out = core(attn.to_q(x), attn.to_k(context), attn.to_v(context), attn.heads, attn.scale)
    return attn.to_out[0](out)


def feed_forward(ff: Block, x: torch.Tensor) -> torch.Tensor:
    projection = ff.net[0]
    hidden = projection.proj(x)
    if type(projection).__name__ == "GEGLU":
        hidden, gate = hidden.chunk(2, dim=1)
        hidden = hidden * F.gelu(gate)
    else:  # GELU(approximate=...) with its own projection
        hidden = F.gelu(hidden, approximate=getattr(projection, "approximate", "none"))
    return ff.net[2](hidden)


def transformer_forward(transformer: Block, x: torch.Tensor, context: torch.Tensor,
                        core: AttentionCore) -> torch.Tensor:
    """diffusers' Transformer2DModel (continuous input) with (B, C, 1, H*W) tokens throughout."""
    batch, _, height, width = x.shape
    h = transformer.proj_in(transformer.norm(x))  # a 1x1 conv in SD 1.x, a linear-turned-conv in SD 2.x
    h = h.reshape(batch, h.shape[1], 1, height * width)
    for block in transformer.transformer_blocks:
        self_context = channel_layer_norm(block.norm1, h)
        h = attention_forward(block.attn1, self_context, context if block.only_cross_attention else self_context,
                              core) + h
        if block.attn2 is not None:
            h = attention_forward(block.attn2, channel_layer_norm(block.norm2, h), context, core) + h
        h = feed_forward(block.ff, channel_layer_norm(block.norm3, h)) + h
    h = transformer.proj_out(h.reshape(batch, h.shape[1], height, width))
    return h + x


# -- the UNet as a list of stages ----------------------------------------------------------------------------

@dataclass
class UnetState:
    """What flows between stages: the hidden states, the time embedding and the pending skip connections."""

    hidden: torch.Tensor
    emb: torch.Tensor
    context: torch.Tensor
    skips: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """One step of the UNet's forward: `run` maps the state's hidden states to new ones. `pop` concatenates the
    newest skip connection first (up blocks); `push` stores the result as a skip connection (down blocks)."""

    name: str
    modules: tuple[nn.Module, ...]
    run: Callable[[UnetState], torch.Tensor]
    pop: bool = False
    push: bool = False

    @property
    def weight_elements(self) -> int:
        return sum(p.numel() for m in self.modules for p in m.parameters())


class AneUnet(nn.Module):
    """A diffusers SD 1.x/2.x or SDXL UNet in the Neural Engine's layout with a given attention core (or a
    ControlNet's encoder half: publisher.convert.controlnet).

    forward(sample (B, 4, H, W), timestep (B,), encoder_hidden_states (B, C, 1, S)[, time_ids (B, N),
    text_embeds (B, P)]) -> noise prediction. The last two are SDXL's micro-conditioning (`addition_embed_type`
    "text_time"): the image geometry and the pooled text embedding, added to the time embedding.
    """

    def __init__(self, unet: Block, core: AttentionCore) -> None:
        super().__init__()
        _check_config(unet)
        linears_to_convs(unet)
        self.unet = unet  # the diffusers module, its linears now 1x1 convs: the state dict keys are diffusers'
        self.core = core
        self.stages = self._stages()

    def load_diffusers_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a diffusers UNet2DConditionModel state dict (keys as diffusers names them)."""
        self.unet.load_state_dict(state_dict, strict=True)

    def _time_embedding(self, timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        embedding = unet.time_embedding
        if embedding.cond_proj is not None or embedding.post_act is not None:
            raise _unsupported("a conditioned time embedding")
        t = unet.time_proj(timestep.reshape(-1)).to(like.dtype)
        t = t[:, :, None, None]
        return embedding.linear_2(embedding.act(embedding.linear_1(t)))

    @property
    def conditioned(self) -> bool:
        """Whether the UNet takes SDXL's time_ids and text_embeds."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    def _added_embedding(self, time_ids: torch.Tensor, text_embeds: torch.Tensor, like: torch.Tensor
                         ) -> torch.Tensor:
        """diffusers' "text_time" embedding: each geometry value gets a sinusoidal embedding, those are
        concatenated after the pooled text embedding and go through the add-embedding MLP, as (B, C, 1, 1)."""
        unet = self.unet
        batch = text_embeds.shape[0]
        geometry = unet.add_time_proj(time_ids.reshape(-1)).reshape(batch, -1).to(like.dtype)
        added = torch.cat([text_embeds.to(like.dtype), geometry], dim=1)[:, :, None, None]
        embedding = unet.add_embedding
        return embedding.linear_2(embedding.act(embedding.linear_1(added)))

    def _stages(self) -> list[Stage]:
        unet, core = self.unet, self.core
        stages = [Stage("conv_in", (unet.conv_in,), lambda s: unet.conv_in(s.hidden), push=True)]

        def resnet(module: Block) -> Callable[[UnetState], torch.Tensor]:
            return lambda s: resnet_forward(module, s.hidden, s.emb)

        def transformer(module: Block) -> Callable[[UnetState], torch.Tensor]:
            return lambda s: transformer_forward(module, s.hidden, s.context, core)

        def plain(module: Block) -> Callable[[UnetState], torch.Tensor]:
            return lambda s: module(s.hidden)

        for b, block in enumerate(unet.down_blocks):
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for i, (res, attn) in enumerate(zip(block.resnets, attentions, strict=True)):
                stages.append(Stage(f"down{b}.resnet{i}", (res,), resnet(res), push=attn is None))
                if attn is not None:
                    stages.append(Stage(f"down{b}.attention{i}", (attn,), transformer(attn), push=True))
            for sampler in block.downsamplers or []:
                stages.append(Stage(f"down{b}.downsample", (sampler,), plain(sampler), push=True))
        mid = unet.mid_block
        if mid is not None:
            stages.append(Stage("mid.resnet0", (mid.resnets[0],), resnet(mid.resnets[0])))
            for i, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
                stages.append(Stage(f"mid.attention{i}", (attn,), transformer(attn)))
                stages.append(Stage(f"mid.resnet{i + 1}", (res,), resnet(res)))
        for b, block in enumerate(getattr(unet, "up_blocks", None) or ()):  # a ControlNet has none
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for i, (res, attn) in enumerate(zip(block.resnets, attentions, strict=True)):
                stages.append(Stage(f"up{b}.resnet{i}", (res,), resnet(res), pop=True))
                if attn is not None:
                    stages.append(Stage(f"up{b}.attention{i}", (attn,), transformer(attn)))
            for sampler in block.upsamplers or []:
                stages.append(Stage(f"up{b}.upsample", (sampler,), plain(sampler)))
        if getattr(unet, "conv_out", None) is None:  # a ControlNet: its outputs are taken from the skips
            return stages
        head = tuple(m for m in (unet.conv_norm_out, unet.conv_out) if m is not None)

        def output(s: UnetState) -> torch.Tensor:
            h = s.hidden
            if unet.conv_norm_out is not None:
                h = unet.conv_act(unet.conv_norm_out(h))
            return unet.conv_out(h)

        stages.append(Stage("out", head, output))
        return stages

    @property
    def time_modules(self) -> tuple[nn.Module, ...]:
        return (self.unet.time_embedding, *((self.unet.add_embedding,) if self.conditioned else ()))

    def start(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
              time_ids: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None) -> UnetState:
        emb = self._time_embedding(timestep, sample)
        if self.conditioned:
            if time_ids is None or text_embeds is None:
                raise ValueError("this UNet (addition_embed_type 'text_time') needs time_ids and text_embeds")
            emb = emb + self._added_embedding(time_ids, text_embeds, sample)
        return UnetState(hidden=sample, emb=emb, context=encoder_hidden_states)

    def run(self, state: UnetState, first: int = 0, stop: int | None = None) -> UnetState:
        """Run stages[first:stop] on `state` (in place) and return it."""
        for stage in self.stages[first:stop]:
            if stage.pop:
                state.hidden = torch.cat([state.hidden, state.skips.pop()], dim=1)
            state.hidden = stage.run(state)
            if stage.push:
                state.skips.append(state.hidden)
        return state

    @property
    def first_up_stage(self) -> int:
        """The index of the first stage after the middle block (where a ControlNet's residuals are added)."""
        return next((i for i, stage in enumerate(self.stages) if stage.name.startswith("up")), len(self.stages))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                time_ids: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                residuals: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """`residuals`: a ControlNet's outputs, as diffusers adds them: one to each skip connection (the
        down-block residuals, in order) and the last to the middle block's output."""
        state = self.start(sample, timestep, encoder_hidden_states, time_ids, text_embeds)
        return self.run_controlled(state, residuals).hidden

    def run_controlled(self, state: UnetState, residuals: tuple[torch.Tensor, ...], first: int = 0,
                       stop: int | None = None) -> UnetState:
        """`run`, adding a ControlNet's residuals where diffusers adds them when stages[first:stop] pass there."""
        up = self.first_up_stage
        stop = len(self.stages) if stop is None else stop
        if not residuals or not first <= up < stop:
            return self.run(state, first, stop)
        self.run(state, first, up)
        if len(residuals) != len(state.skips) + 1:
            raise ValueError(f"expected {len(state.skips) + 1} ControlNet residuals, got {len(residuals)}")
        state.skips = [skip + residual for skip, residual in zip(state.skips, residuals[:-1], strict=True)]
        state.hidden = state.hidden + residuals[-1]
        return self.run(state, up, stop)
