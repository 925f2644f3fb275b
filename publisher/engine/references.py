"""Reference sharing among verify steps: the float model's outputs are computed once per build and component (by
the first verify step of its group, cut in two for its chunks), and a compressed package that decodes to the same
weights as an earlier one is held to that one's PyTorch outputs. This part says which steps share and in which
order they must run; the verify step (engine/steps.py) reads and fills the shared outputs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from publisher.engine.state import BuildState
from publisher.plan import CompressParams, Step, VerifyParams
from publisher.vocabulary import Component, Resolution


class References:
    def __init__(self, state: BuildState) -> None:
        self.state = state
        # (source, submodule, resolution, family) -> saved float reference (a few MB): one PyTorch run per build
        self.floats: dict[tuple[str, str, Resolution, str], bytes] = {}
        # the same key -> the references of its compressed packages by the digest of their decoded weights
        self.decoded: dict[tuple[str, str, Resolution, str], dict[str, bytes]] = {}

    def group(self, step: Step) -> tuple[Any, ...] | None:
        """Verify steps with the same group share one float forward (see _do_verify): those of a component and of
        its chunks. None: not a verify step."""
        if step.kind != "verify" or not isinstance(step.params, VerifyParams):
            return None
        variant = self.state.variant_of(step)
        return (tuple(self.state.fetches_of(step)), step.params.component,
                variant.size_of_component(Component(step.params.component)), variant.family)

    def compression_of(self, step: Step) -> tuple[str, str] | None:
        """A verify step's package's compression (scheme, settings), None for a float16 package."""
        package = self.state.plan.steps.get(step.inputs[0]) if step.inputs else None
        if package is None or not isinstance(package.params, CompressParams):
            return None
        return package.params.scheme, json.dumps(package.params.settings, sort_keys=True)

    def waits_for(self, step: Step, steps: Sequence[Step]) -> set[str]:
        """The steps among `steps` this one must follow: its inputs, and for a verify step that reuses a float
        reference (below), the first verify step of its group, which computes it."""
        ids = {s.id for s in steps}
        before = {i for i in step.inputs if i in ids}
        group = self.group(step)
        if group is not None:
            producer = next((s for s in steps if self.group(s) == group and not self.state.is_chunk(s)),
                            None)
            if producer is not None and producer.id != step.id:
                before.add(producer.id)
            compression = self.compression_of(step)
            if compression is not None:  # the first package compressed alike may share its decoded reference
                first = next(s for s in steps if self.group(s) == group
                             and self.compression_of(s) == compression)
                if first.id != step.id:
                    before.add(first.id)
        return before
