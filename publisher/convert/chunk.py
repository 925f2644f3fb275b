"""The UNet in two chunks (float16 on iOS, where one package of a full UNet is too large to load at once).

The ANE-shaped UNet (publisher.convert.unet) is a flat list of stages; the cut goes between the two stages where
the weight bytes split most evenly (the time embedding counts in chunk 1, which computes it). Chunk 1's outputs
are the state at the cut: the time embedding, the hidden states and the pending skip connections, float32 as
every output. Chunk 2 takes them by name, plus `encoder_hidden_states` from the UNet's own inputs: the Swift
pipeline feeds the first chunk's outputs merged with the original inputs to the second, so chunk2(chunk1(x)) is
the whole UNet by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from publisher.contract import FLOAT32, TensorSpec
from publisher.convert.components import Unet
from publisher.convert.coreml import PackageMetadata
from publisher.convert.unet import AneUnet, UnetState
from publisher.deployment import DeploymentTarget
from publisher.vocabulary import Attention, Component, Resolution


@dataclass(frozen=True)
class ChunkSpecs:
    cut: int  # chunk 1 runs stages[:cut], chunk 2 stages[cut:]
    chunk1_inputs: tuple[TensorSpec, ...]
    chunk1_outputs: tuple[TensorSpec, ...]
    chunk2_inputs: tuple[TensorSpec, ...]
    chunk2_outputs: tuple[TensorSpec, ...]


def balanced_cut(unet: AneUnet) -> int:
    """The stage index where the weights before and after are nearest to equal (never 0 or the end)."""
    sizes = [stage.weight_elements for stage in unet.stages]
    before = sum(p.numel() for m in unet.time_modules for p in m.parameters())
    total = before + sum(sizes)
    best, best_gap = 1, None
    for index in range(1, len(sizes)):
        before += sizes[index - 1]
        gap = abs(total - 2 * before)
        if best_gap is None or gap < best_gap:
            best, best_gap = index, gap
    return best


def chunk_weight_elements(unet: AneUnet, cut: int) -> tuple[int, int]:
    first = sum(p.numel() for m in unet.time_modules for p in m.parameters())
    first += sum(stage.weight_elements for stage in unet.stages[:cut])
    return first, sum(stage.weight_elements for stage in unet.stages[cut:])


class UnetChunk1(nn.Module):
    def __init__(self, wrapper: Unet, cut: int) -> None:
        super().__init__()
        self.wrapper = wrapper
        self.cut = cut

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *conditioning: torch.Tensor) -> tuple[torch.Tensor, ...]:
        unet = self.wrapper.unet
        state = unet.run(unet.start(sample, timestep, encoder_hidden_states, *conditioning), 0, self.cut)
        return (state.emb, state.hidden, *state.skips)


class UnetChunk2(nn.Module):
    def __init__(self, wrapper: Unet, cut: int) -> None:
        super().__init__()
        self.wrapper = wrapper
        self.cut = cut

    def forward(self, encoder_hidden_states: torch.Tensor, emb: torch.Tensor, hidden_states: torch.Tensor,
                *skips: torch.Tensor) -> torch.Tensor:
        state = UnetState(hidden=hidden_states, emb=emb, context=encoder_hidden_states, skips=list(skips))
        return self.wrapper.unet.run(state, self.cut).hidden


def chunk_specs(wrapper: Unet, unet_inputs: tuple[TensorSpec, ...], unet_outputs: tuple[TensorSpec, ...],
                example: tuple[torch.Tensor, ...]) -> tuple[ChunkSpecs, tuple[torch.Tensor, ...]]:
    """Where to cut, and the names and shapes of the tensors crossing the cut (found by running chunk 1 once);
    also returns chunk 1's outputs for `example`."""
    cut = balanced_cut(wrapper.unet)
    with torch.no_grad():
        intermediates = UnetChunk1(wrapper, cut)(*example)
    names = ["emb", "hidden_states"] + [f"skip_{i}" for i in range(len(intermediates) - 2)]
    middle = tuple(TensorSpec(name, tuple(t.shape), "intermediate of the chunked UNet", FLOAT32)
                   for name, t in zip(names, intermediates, strict=True))
    context = next(t for t in unet_inputs if t.name == "encoder_hidden_states")
    return ChunkSpecs(cut, unet_inputs, middle, (context, *middle), unet_outputs), intermediates


def convert_unet_chunks(source: Path, attention: Attention, resolution: Resolution, target: DeploymentTarget,
                        outputs: tuple[Path | None, Path | None], metadata: PackageMetadata, family: str = "sd",
                        component: Component = Component.UNET) -> list[str]:
    """Convert a UNet of `source` (the `unet`, or SDXL's `refiner`) into its two chunk packages (a None output
    skips that chunk)."""
    from publisher.convert.components import example_inputs, load_component
    from publisher.convert.coreml import convert_module

    loaded = load_component(Path(source), component, attention, resolution, family=family)
    example = example_inputs(loaded.spec)
    assert isinstance(loaded.module, Unet)
    specs, intermediates = chunk_specs(loaded.module, loaded.spec.inputs, loaded.spec.outputs, example)
    paths = []
    first, second = outputs
    if first is not None:
        paths.append(convert_module([UnetChunk1(loaded.module, specs.cut)], loaded.spec, example, target,
                                    metadata, first, specs.chunk1_inputs, specs.chunk1_outputs).path)
    if second is not None:
        context = example[2]
        paths.append(convert_module([UnetChunk2(loaded.module, specs.cut)], loaded.spec,
                                    (context, *intermediates), target, metadata, second,
                                    specs.chunk2_inputs, specs.chunk2_outputs).path)
    return paths
