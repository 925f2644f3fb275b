"""Attention implementations for conversion, written from the published description of the Neural Engine layout.

ORIGINAL leaves diffusers' modules as they are. SPLIT_EINSUM keeps activations 4-D as (B, C, 1, S), runs every
linear layer as a 1x1 convolution, normalises over the channel axis, and computes attention one head at a time
with einsums. SPLIT_EINSUM_V2 additionally cuts the query sequence into chunks of 512, so that no intermediate
holds a (keys x all-queries) matrix; below 512 queries it is SPLIT_EINSUM.

The rewritten modules take over the original modules' children under the same attribute names, so the
diffusers state dict loads into them unchanged (same keys, same shapes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from publisher.manifest import Attention

QUERY_CHUNK = 512


def linear_as_conv(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear layer to (B, C, 1, S) activations as a 1x1 convolution over C."""
    return F.conv2d(x, layer.weight[:, :, None, None], layer.bias)


def channel_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channel axis of (B, C, 1, S)."""
    mean = x.mean(dim=1, keepdim=True)
    centered = x - mean
    variance = (centered * centered).mean(dim=1, keepdim=True)
    out = centered * torch.rsqrt(variance + norm.eps)
    if norm.weight is not None:
        out = out * norm.weight[None, :, None, None]
    if norm.bias is not None:
        out = out + norm.bias[None, :, None, None]
    return out


def split_einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           query_chunk: int | None) -> torch.Tensor:
    """Attention on (B, C, 1, S) tensors, one head (and optionally one query chunk) at a time.

    q is expected to be pre-scaled. Scores are laid out (B, S_keys, 1, S_queries), softmax over the keys.
    """
    head_dim = q.shape[1] // heads
    queries = q.shape[3]
    outputs = []
    for head in range(heads):
        channels = slice(head * head_dim, (head + 1) * head_dim)
        q_h, k_h, v_h = q[:, channels], k[:, channels], v[:, channels]
        if query_chunk is None or queries <= query_chunk:
            pieces = [q_h]
        else:
            pieces = [q_h[:, :, :, start:start + query_chunk] for start in range(0, queries, query_chunk)]
        results = []
        for piece in pieces:
            scores = torch.einsum("bchq,bchk->bkhq", piece, k_h).softmax(dim=1)
            results.append(torch.einsum("bkhq,bchk->bchq", scores, v_h))
        outputs.append(results[0] if len(results) == 1 else torch.cat(results, dim=3))
    return torch.cat(outputs, dim=1)


def _attend(attn: Any, x: torch.Tensor, context: torch.Tensor | None, query_chunk: int | None) -> torch.Tensor:
    """A diffusers `Attention` (to_q/k/v, to_out[0]) on (B, C, 1, S) activations."""
    context = x if context is None else context
    q = linear_as_conv(attn.to_q, x) * attn.scale
    k = linear_as_conv(attn.to_k, context)
    v = linear_as_conv(attn.to_v, context)
    out = split_einsum_attention(q, k, v, attn.heads, query_chunk)
    return linear_as_conv(attn.to_out[0], out)


def _feed_forward(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    projection = ff.net[0]
    hidden = linear_as_conv(projection.proj, x)
    if type(projection).__name__ == "GEGLU":
        hidden, gate = hidden.chunk(2, dim=1)
        hidden = hidden * F.gelu(gate)
    else:  # GELU(approximate=...) with its own projection
        hidden = F.gelu(hidden, approximate=getattr(projection, "approximate", "none"))
    return linear_as_conv(ff.net[2], hidden)


class SplitEinsumTransformer2D(nn.Module):
    """Replaces diffusers' Transformer2DModel (continuous input, layer_norm blocks) in the 4-D layout."""

    def __init__(self, original: nn.Module, query_chunk: int | None) -> None:
        super().__init__()
        self.norm = original.norm
        self.proj_in = original.proj_in
        self.transformer_blocks = original.transformer_blocks
        self.proj_out = original.proj_out
        self.use_linear_projection = bool(original.use_linear_projection)
        self.query_chunk = query_chunk
        for block in self.transformer_blocks:
            if getattr(block, "norm_type", "layer_norm") != "layer_norm" or getattr(block, "pos_embed", None):
                raise NotImplementedError(f"SPLIT_EINSUM supports layer_norm transformer blocks, not {block.norm_type}")

    def _project(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return linear_as_conv(layer, x) if isinstance(layer, nn.Linear) else layer(x)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                return_dict: bool = True, **_: Any) -> Any:
        batch, _channels, height, width = hidden_states.shape
        residual = hidden_states
        x = self.norm(hidden_states)
        x = x.reshape(batch, x.shape[1], 1, height * width)
        x = self._project(self.proj_in, x)
        context = encoder_hidden_states
        if context is not None and context.dim() == 3:  # (B, S, C) -> (B, C, 1, S)
            context = context.transpose(1, 2).unsqueeze(2)
        for block in self.transformer_blocks:
            context_1 = context if block.only_cross_attention else None
            x = _attend(block.attn1, channel_layer_norm(block.norm1, x), context_1, self.query_chunk) + x
            if block.attn2 is not None:
                x = _attend(block.attn2, channel_layer_norm(block.norm2, x), context, self.query_chunk) + x
            x = _feed_forward(block.ff, channel_layer_norm(block.norm3, x)) + x
        x = self._project(self.proj_out, x)
        output = x.reshape(batch, x.shape[1], height, width) + residual
        return (output,) if not return_dict else _Output(output)


class _Output:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


class SplitEinsumSpatialAttention(nn.Module):
    """Replaces the VAE's single-head spatial `Attention` (group norm, residual) in the 4-D layout."""

    def __init__(self, original: Any, query_chunk: int | None) -> None:
        super().__init__()
        self.group_norm = original.group_norm
        self.to_q, self.to_k, self.to_v, self.to_out = original.to_q, original.to_k, original.to_v, original.to_out
        self.heads = original.heads
        self.scale = original.scale
        self.residual_connection = original.residual_connection
        self.rescale_output_factor = original.rescale_output_factor
        self.query_chunk = query_chunk

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        residual = hidden_states
        x = self.group_norm(hidden_states) if self.group_norm is not None else hidden_states
        x = x.reshape(batch, channels, 1, height * width)
        out = _attend(self, x, None, self.query_chunk).reshape(batch, channels, height, width)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


def query_chunk_for(attention: Attention) -> int | None:
    return QUERY_CHUNK if attention is Attention.SPLIT_EINSUM_V2 else None


def apply_attention(model: nn.Module, attention: Attention) -> nn.Module:
    """Swap attention modules in place for the given implementation; returns the model."""
    if attention is Attention.ORIGINAL:
        return model
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    chunk = query_chunk_for(attention)
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Transformer2DModel):
                replacements.append((parent, name, SplitEinsumTransformer2D(child, chunk)))
            elif isinstance(child, DiffusersAttention) and child.group_norm is not None and not child.is_cross_attention:
                replacements.append((parent, name, SplitEinsumSpatialAttention(child, chunk)))
    for parent, name, replacement in replacements:
        setattr(parent, name, replacement)
    return model
