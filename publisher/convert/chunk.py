"""The UNet (or the ControlledUnet) in two chunks (float16 on iOS, where one package of a full UNet is too large to
load at once).

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

from publisher.contract import FLOAT32, RESIDUAL_PREFIX, TensorSpec
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
    # a ControlledUnet's residual inputs: how many, and which chunk adds them (the one that runs the first up
    # stage, where diffusers adds them: 1 or 2; 0 for a UNet without them)
    residuals: int = 0
    residuals_in: int = 0

    def modules(self, wrapper: Unet) -> tuple[UnetChunk1, UnetChunk2]:
        return (UnetChunk1(wrapper, self.cut, self.residuals if self.residuals_in == 1 else 0),
                UnetChunk2(wrapper, self.cut, self.residuals if self.residuals_in == 2 else 0))

    def chunk1_example(self, example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Chunk 1's share of the component's inputs (the residuals only where it adds them: they come last)."""
        return example if self.residuals_in != 2 else example[:len(example) - self.residuals]

    def chunk2_example(self, example: tuple[torch.Tensor, ...], intermediates: tuple[torch.Tensor, ...]
                       ) -> tuple[torch.Tensor, ...]:
        """Chunk 2's inputs: the text embeddings, the residuals where it adds them, the tensors crossing the cut."""
        residuals = example[len(example) - self.residuals:] if self.residuals_in == 2 else ()
        return (example[2], *residuals, *intermediates)


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
    """stages[:cut]; `residuals`: the ControlNet residuals among its last inputs, which it adds."""

    def __init__(self, wrapper: Unet, cut: int, residuals: int = 0) -> None:
        super().__init__()
        self.wrapper = wrapper
        self.cut = cut
        self.residuals = residuals

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        unet = self.wrapper.unet
        conditioning, residuals = rest[:len(rest) - self.residuals], rest[len(rest) - self.residuals:]
        state = unet.start(sample, timestep, encoder_hidden_states, *conditioning)
        state = unet.run_controlled(state, tuple(residuals), 0, self.cut)
        return (state.emb, state.hidden, *state.skips)


class UnetChunk2(nn.Module):
    """stages[cut:] on the tensors crossing the cut; `residuals`: the ControlNet residuals it adds (inputs after
    the text embeddings)."""

    def __init__(self, wrapper: Unet, cut: int, residuals: int = 0) -> None:
        super().__init__()
        self.wrapper = wrapper
        self.cut = cut
        self.residuals = residuals

    def forward(self, encoder_hidden_states: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        residuals, (emb, hidden_states, *skips) = rest[:self.residuals], rest[self.residuals:]
        state = UnetState(hidden=hidden_states, emb=emb, context=encoder_hidden_states, skips=list(skips))
        return self.wrapper.unet.run_controlled(state, tuple(residuals), self.cut).hidden


def chunk_specs(wrapper: Unet, unet_inputs: tuple[TensorSpec, ...], unet_outputs: tuple[TensorSpec, ...],
                example: tuple[torch.Tensor, ...]) -> tuple[ChunkSpecs, tuple[torch.Tensor, ...]]:
    """Where to cut, and the names and shapes of the tensors crossing the cut (found by running chunk 1 once);
    also returns chunk 1's outputs for `example`. A ControlledUnet's residual inputs go to the chunk that adds them."""
    cut = balanced_cut(wrapper.unet)
    residual_specs = tuple(t for t in unet_inputs if t.name.startswith(RESIDUAL_PREFIX))
    residuals_in = 0 if not residual_specs else 1 if wrapper.unet.first_up_stage < cut else 2
    shape = ChunkSpecs(cut, (), (), (), (), len(residual_specs), residuals_in)
    with torch.no_grad():
        intermediates = shape.modules(wrapper)[0](*shape.chunk1_example(example))
    names = ["emb", "hidden_states"] + [f"skip_{i}" for i in range(len(intermediates) - 2)]
    middle = tuple(TensorSpec(name, tuple(t.shape), "intermediate of the chunked UNet", FLOAT32)
                   for name, t in zip(names, intermediates, strict=True))
    context = next(t for t in unet_inputs if t.name == "encoder_hidden_states")
    first_inputs = unet_inputs if residuals_in != 2 else tuple(t for t in unet_inputs if t not in residual_specs)
    second_inputs = (context, *(residual_specs if residuals_in == 2 else ()), *middle)
    return ChunkSpecs(cut, first_inputs, middle, second_inputs, unet_outputs, len(residual_specs),
                      residuals_in), intermediates


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
    chunk1, chunk2 = specs.modules(loaded.module)
    if first is not None:
        paths.append(convert_module([chunk1], loaded.spec, specs.chunk1_example(example), target,
                                    metadata, first, specs.chunk1_inputs, specs.chunk1_outputs).path)
    if second is not None:
        paths.append(convert_module([chunk2], loaded.spec, specs.chunk2_example(example, intermediates), target,
                                    metadata, second, specs.chunk2_inputs, specs.chunk2_outputs).path)
    return paths
