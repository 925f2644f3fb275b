"""The scheduler: steps side by side, each once its inputs are done, within the memory budget, the longest chains
of estimated durations first, the cores shared out among the steps started together."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol

from publisher.engine.state import BuildError, BuildState
from publisher.plan import Step
from publisher.vocabulary import Attention


class Runner(Protocol):
    """What the scheduler asks of the build (tests give it a stand-in)."""

    def waits_for(self, step: Step, steps: Sequence[Step]) -> set[str]: ...

    def memory_estimate(self, step: Step) -> int: ...

    def duration_estimate(self, step: Step) -> float: ...

    def run_step(self, step: Step, threads: int | None = None) -> None: ...


# What a heavy step's process peaks at, per byte of its component's float32 weights (measured at full size: the
# SD 1.5 UNet's conversion 1.3x, the palettized UNet's verification 1.8x, the SDXL UNet's conversion 1.35x), plus a
# fixed part (the libraries, the inputs, the executor's activations).
MEMORY_PER_WEIGHT_BYTE = 2.0
MEMORY_FIXED_BYTES = 1 << 30
HEAVY_KINDS = frozenset({"convert", "chunk", "analyze", "compress", "verify", "coreai"})
# A step's expected duration per byte of its component's weights, relative to verifying it (measured at full size:
# the SD 1.5 UNet converts in ~70 s with ORIGINAL attention, ~250 s with SPLIT_EINSUM_V2, ~50-80 s to verify; the
# mixed-bit analysis ~24 min). Only the order of the parallel schedule depends on these: longest chains first.
DURATION_PER_WEIGHT_BYTE = {"convert": 1.0, "chunk": 2.0, "analyze": 20.0, "compress": 0.2, "verify": 1.0,
                            "coreai": 1.0}
ATTENTION_DURATION = {Attention.ORIGINAL.value: 1.0, Attention.SPLIT_EINSUM.value: 2.0,
                      Attention.SPLIT_EINSUM_V2.value: 3.5}


def memory_budget() -> int:
    """The memory parallel steps may use: what the system has available now (Linux), else half of it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError):
        return 0


def step_threads(running_at_once: int, cores: int | None = None) -> int:
    """torch's threads for a step started with `running_at_once - 1` others: the cores shared out. Two steps of
    two threads each on two cores are slower than of one each (measured, full-size UNet, two processes at once:
    the executor 58 s against 36 s each, the PyTorch forward 29 s against 27 s)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, running_at_once))


def run_steps(runner: Runner, steps: Sequence[Step], jobs: int, budget: int,
              started: Callable[[Step], None] = lambda _: None, finished: Callable[[Step], None] = lambda _: None,
              ) -> None:
    """Run the steps, each once the steps it reads are done: up to `jobs` at a time, a step started beside
    others only when all their estimated peaks fit in `budget` bytes (a step alone always starts). Each heavy
    step runs in a process of its own, so threads here only wait; it gets the cores shared out among the steps
    running when it starts (one started alone stays alone: no other step can become ready before it ends). The
    order of `steps` is the tie-break."""
    if jobs <= 1:
        for step in steps:
            started(step)
            runner.run_step(step)
            finished(step)
        return
    waiting = list(steps)
    needs = {step.id: runner.waits_for(step, steps) for step in steps}
    done: set[str] = set()
    running: dict[Future[None], tuple[Step, int]] = {}
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="step") as pool:
        while waiting or running:
            in_use = sum(estimate for _, estimate in running.values())
            chains = _chain_durations(runner, waiting, needs)  # the longest chains first: the tail stays short
            ready = sorted((s for s in waiting if needs[s.id] <= done), key=lambda s: -chains[s.id])
            starting: list[tuple[Step, int]] = []
            for step in ready:
                if len(running) + len(starting) >= jobs:
                    break
                estimate = runner.memory_estimate(step)
                if (running or starting) and in_use + estimate > budget:
                    continue  # a lighter step further on may still fit
                starting.append((step, estimate))
                in_use += estimate
            threads = step_threads(len(running) + len(starting))
            for step, estimate in starting:
                waiting.remove(step)
                started(step)
                running[pool.submit(runner.run_step, step, threads)] = (step, estimate)
            if not running:  # nothing can start: an input is not among the steps (it stays unbuilt)
                raise BuildError(f"{waiting[0].id}: waits for a step that is not run")
            finishing, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finishing:
                step, _ = running.pop(future)
                future.result()  # a bug in the engine itself: stop the build
                done.add(step.id)
                finished(step)


def _chain_durations(runner: Runner, steps: Sequence[Step], needs: dict[str, set[str]]) -> dict[str, float]:
    """Per step, its expected duration plus that of the longest chain of steps waiting for it (estimates made now:
    a step's weights are known once its source is fetched)."""
    readers: dict[str, list[str]] = {s.id: [] for s in steps}
    for step in steps:
        for before in needs[step.id]:
            if before in readers:
                readers[before].append(step.id)
    own = {s.id: runner.duration_estimate(s) for s in steps}
    chains: dict[str, float] = {}
    for step in reversed(steps):  # readers come after what they read in a plan
        chains[step.id] = own[step.id] + max((chains.get(r, 0.0) for r in readers[step.id]), default=0.0)
    return chains



def memory_estimate(state: BuildState, step: Step) -> int:
    """A heavy step's expected peak (bytes), from its component's weights in the source; 0 for the rest."""
    if step.kind not in HEAVY_KINDS:
        return 0
    return MEMORY_FIXED_BYTES + int(MEMORY_PER_WEIGHT_BYTE * state.weight_bytes(step))


def duration_estimate(state: BuildState, step: Step) -> float:
    """A heavy step's expected duration in arbitrary units (weight bytes x a factor per kind and attention)."""
    if step.kind not in DURATION_PER_WEIGHT_BYTE:
        return 0.0
    attention = getattr(step.params, "attention", None)
    if step.kind == "verify":
        attention = state.variant_of(step).attention.value
    return DURATION_PER_WEIGHT_BYTE[step.kind] * ATTENTION_DURATION.get(attention or "", 1.0) * state.weight_bytes(step)
