"""The UNet in two chunks (float16 on iOS, where one package is too large to load at once).

Chunk 1 runs the time embedding, conv_in, the down blocks and the mid block; chunk 2 the up blocks and the output
head. Chunk 1's outputs are chunk 2's inputs by name (the Swift pipeline feeds every output of the first chunk,
plus the original inputs, to the second), so chunk2(chunk1(x)) is the whole UNet by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from publisher.contract import TensorSpec
from publisher.convert.components import Unet
from publisher.manifest import Attention


@dataclass(frozen=True)
class ChunkSpecs:
    chunk1_inputs: tuple[TensorSpec, ...]
    chunk1_outputs: tuple[TensorSpec, ...]
    chunk2_inputs: tuple[TensorSpec, ...]
    chunk2_outputs: tuple[TensorSpec, ...]


def _context(wrapper: Unet, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    if wrapper.attention is Attention.ORIGINAL:
        return encoder_hidden_states.squeeze(2).transpose(1, 2)
    return encoder_hidden_states


class UnetChunk1(nn.Module):
    def __init__(self, wrapper: Unet) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        unet = self.wrapper.unet
        context = _context(self.wrapper, encoder_hidden_states)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep).to(sample.dtype))
        sample = unet.conv_in(sample)
        residuals: tuple[torch.Tensor, ...] = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            residuals += res
        sample = unet.mid_block(sample, emb, encoder_hidden_states=context)
        return (emb, sample, *residuals)


class UnetChunk2(nn.Module):
    def __init__(self, wrapper: Unet) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, encoder_hidden_states: torch.Tensor, emb: torch.Tensor, mid: torch.Tensor,
                *residuals: torch.Tensor) -> torch.Tensor:
        unet = self.wrapper.unet
        context = _context(self.wrapper, encoder_hidden_states)
        sample = mid
        pending = tuple(residuals)
        for index, block in enumerate(unet.up_blocks):
            count = len(block.resnets)
            res, pending = pending[-count:], pending[:-count]
            size = pending[-1].shape[2:] if index < len(unet.up_blocks) - 1 and pending else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=context, upsample_size=size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)


def chunk_specs(wrapper: Unet, unet_inputs: tuple[TensorSpec, ...], unet_outputs: tuple[TensorSpec, ...],
                example: tuple[torch.Tensor, ...]) -> tuple[ChunkSpecs, tuple[torch.Tensor, ...]]:
    """Names and shapes of the intermediate tensors, found by running chunk 1 once; also returns its outputs."""
    with torch.no_grad():
        intermediates = UnetChunk1(wrapper)(*example)
    names = ["emb", "mid"] + [f"down_res_{i}" for i in range(len(intermediates) - 2)]
    middle = tuple(TensorSpec(name, tuple(t.shape), "intermediate of the chunked UNet")
                   for name, t in zip(names, intermediates, strict=True))
    context = next(t for t in unet_inputs if t.name == "encoder_hidden_states")
    return ChunkSpecs(unet_inputs, middle, (context, *middle), unet_outputs), intermediates


def convert_unet_chunks(source: Path, attention: Attention, resolution: int, target: object,
                        outputs: tuple[Path | None, Path | None], metadata: object) -> list[str]:
    """Convert the UNet of `source` into its two chunk packages (a None output skips that chunk)."""
    from publisher.convert.components import example_inputs, load_component
    from publisher.convert.coreml import convert_module
    from publisher.manifest import Component

    loaded = load_component(Path(source), Component.UNET, attention, resolution)
    example = example_inputs(loaded.spec)
    assert isinstance(loaded.module, Unet)
    specs, intermediates = chunk_specs(loaded.module, loaded.spec.inputs, loaded.spec.outputs, example)
    paths = []
    if outputs[0] is not None:
        paths.append(convert_module([UnetChunk1(loaded.module)], loaded.spec, example, target,  # type: ignore[arg-type]
                                    metadata, outputs[0], specs.chunk1_inputs, specs.chunk1_outputs).path)  # type: ignore[arg-type]
    if outputs[1] is not None:
        context = example[2]
        paths.append(convert_module([UnetChunk2(loaded.module)], loaded.spec, (context, *intermediates),  # type: ignore[arg-type]
                                    target, metadata, outputs[1], specs.chunk2_inputs,  # type: ignore[arg-type]
                                    specs.chunk2_outputs).path)
    return paths
