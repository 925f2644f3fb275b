"""Attention cores for conversion, written from the published description of the Neural Engine layout.

Every core takes queries and keys/values as (B, C, 1, S) tensors (C = heads x head_dim) and the attention scale, and
returns (B, C, 1, S_queries). The scale multiplies the scores, as Apple's converter does, not the queries: a scalar
after a linear layer is folded into its weight by coremltools, and the published `to_q` weights would no longer be
PyTorch's (Apple's apply script and our verification match weights by value). Only the core differs between the
three attention implementations:

- ORIGINAL: all heads at once, (B, heads, head_dim, S) views and two batched products; coremltools lowers both
  einsums to a `matmul` with transposed operands, so the graph has no `transpose`.
- SPLIT_EINSUM: one head at a time. The keys are transposed once to (B, S_keys, 1, C); per head the scores are
  `bchq,bkhc->bkhq` and the output `bkhq,bchk->bchq`, the form Core ML's own `einsum` op implements, so the graph
  has one `transpose` per attention layer and no `matmul`.
- SPLIT_EINSUM_V2: SPLIT_EINSUM with the queries cut into chunks of 512, so that no intermediate holds a
  (keys x all-queries) matrix; below 512 queries it is SPLIT_EINSUM. A last shorter chunk is kept.

The VAE keeps diffusers' attention for every implementation, as Apple's converter does. `Conv1x1` and
`linears_to_convs` serve the ANE-shaped UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from publisher.vocabulary import Attention

QUERY_CHUNK = 512
AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


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


def original_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    batch, channels, _, queries = q.shape
    head_dim = channels // heads
    q = q.reshape(batch, heads, head_dim, queries)
    k = k.reshape(batch, heads, head_dim, k.shape[3])
    v = v.reshape(batch, heads, head_dim, v.shape[3])
    weights = (torch.einsum("bhcq,bhck->bhqk", q, k) * scale).softmax(dim=3)
    out = torch.einsum("bhqk,bhck->bhcq", weights, v)
    return out.reshape(batch, channels, 1, queries)


def split_einsum_core(query_chunk: int | None) -> AttentionCore:
    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        head_dim = q.shape[1] // heads
        queries = q.shape[3]
        keys_last = k.transpose(1, 3)  # (B, S_keys, 1, C): the one transpose of the layer
        step = queries if query_chunk is None else query_chunk
        outputs = []
        for head in range(heads):
            channels = slice(head * head_dim, (head + 1) * head_dim)
            k_h, v_h = keys_last[:, :, :, channels], v[:, channels]
            pieces = []
            for start in range(0, queries, step):
                q_h = q[:, channels, :, start:start + step]
                weights = (torch.einsum("bchq,bkhc->bkhq", q_h, k_h) * scale).softmax(dim=1)
                pieces.append(torch.einsum("bkhq,bchk->bchq", weights, v_h))
            outputs.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=3))
        return torch.cat(outputs, dim=1)

    return core


def attention_core(attention: Attention) -> AttentionCore:
    if attention is Attention.ORIGINAL:
        return original_core
    return split_einsum_core(QUERY_CHUNK if attention is Attention.SPLIT_EINSUM_V2 else None)


class Conv1x1(nn.Conv2d):
    """A Linear layer as a 1x1 convolution over the channel axis of a 4-D tensor."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Conv1x1:
        conv = cls(linear.in_features, linear.out_features, 1, bias=linear.bias is not None, device="meta")
        conv.weight = nn.Parameter(linear.weight.detach().view(linear.out_features, linear.in_features, 1, 1),
                                   requires_grad=False)
        if linear.bias is not None:
            conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return conv

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:  # a diffusers (out, in) linear weight
            state_dict = dict(state_dict)
            state_dict[prefix + "weight"] = weight[:, :, None, None]
        super()._load_from_state_dict(state_dict, prefix, *args)


def linears_to_convs(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by a Conv1x1 sharing its weights; returns how many."""
    swaps = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    for parent, name, child in swaps:
        setattr(parent, name, Conv1x1.from_linear(child))
    return len(swaps)
