"""The build's step scheduler: inputs first, at most `jobs` at once, estimated peaks within the memory budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from publisher.engine.build import BuildError, run_steps, step_threads
from publisher.plan import ConvertParams, Step


@dataclass
class FakeRunner:
    """Steps that sleep; records when each ran and what ran beside it."""

    estimates: dict[str, int]
    extra_waits: dict[str, set[str]] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.05
    running: set[str] = field(default_factory=set)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)
    beside: list[set[str]] = field(default_factory=list)
    threads: dict[str, int | None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def waits_for(self, step: Step, steps: Sequence[Step]) -> set[str]:
        ids = {s.id for s in steps}
        return {i for i in step.inputs if i in ids} | self.extra_waits.get(step.id, set())

    def memory_estimate(self, step: Step) -> int:
        return self.estimates.get(step.id, 0)

    def duration_estimate(self, step: Step) -> float:
        return self.durations.get(step.id, 0.0)

    def run_step(self, step: Step, threads: int | None = None) -> None:
        start = time.perf_counter()
        self.threads[step.id] = threads
        with self.lock:
            self.running.add(step.id)
            self.beside.append(set(self.running))
        time.sleep(self.seconds)
        with self.lock:
            self.running.discard(step.id)
        self.spans[step.id] = (start, time.perf_counter())


def step(name: str, *inputs: str) -> Step:
    return Step(name, "convert", tuple(inputs), ConvertParams("unet", None, 512, "iOS16"), [])


def test_inputs_finish_before_their_readers_start_and_jobs_bound_the_overlap() -> None:
    steps = [step("a"), step("b"), step("c", "a"), step("d", "a", "b"), step("e", "c", "d"), step("f")]
    runner = FakeRunner(estimates={})
    run_steps(runner, steps, jobs=2, budget=0)  # type: ignore[arg-type]
    assert set(runner.spans) == {s.id for s in steps}
    for s in steps:
        for source in s.inputs:
            assert runner.spans[source][1] <= runner.spans[s.id][0], (source, s.id)
    assert max(len(group) for group in runner.beside) == 2  # it did run two at once, never three
    # the extra order a runner asks for (a verify step after the one that computes its float reference)
    runner = FakeRunner(estimates={}, extra_waits={"b": {"a"}})
    run_steps(runner, [step("a"), step("b")], jobs=2, budget=0)  # type: ignore[arg-type]
    assert runner.spans["a"][1] <= runner.spans["b"][0]


def test_memory_budget_keeps_heavy_steps_apart_and_lets_light_ones_through() -> None:
    gib = 1 << 30
    steps = [step("unet-1"), step("unet-2"), step("vae"), step("text")]
    runner = FakeRunner(estimates={"unet-1": 8 * gib, "unet-2": 8 * gib, "vae": 2 * gib, "text": 1 * gib})
    run_steps(runner, steps, jobs=2, budget=12 * gib)  # type: ignore[arg-type]
    for group in runner.beside:
        assert not {"unet-1", "unet-2"} <= group
        if len(group) > 1:
            assert sum(runner.estimates[s] for s in group) <= 12 * gib
    assert any(len(group) == 2 for group in runner.beside)  # a light step ran beside a heavy one
    # a step heavier than the whole budget still runs, alone
    runner = FakeRunner(estimates={"big": 20 * gib, "small": gib})
    run_steps(runner, [step("big"), step("small")], jobs=2, budget=12 * gib)  # type: ignore[arg-type]
    assert all(len(group) == 1 for group in runner.beside) and set(runner.spans) == {"big", "small"}


def test_one_job_is_plan_order() -> None:
    steps = [step("b"), step("a"), step("c", "a")]
    runner = FakeRunner(estimates={}, seconds=0.0)
    run_steps(runner, steps, jobs=1, budget=0)  # type: ignore[arg-type]
    assert sorted(runner.spans, key=lambda s: runner.spans[s][0]) == ["b", "a", "c"]


def test_a_step_waiting_for_a_step_not_run_is_an_error() -> None:
    with pytest.raises(BuildError, match="waits for a step that is not run"):
        run_steps(FakeRunner(estimates={}, extra_waits={"a": {"missing"}}), [step("a")], jobs=2,  # type: ignore[arg-type]
                  budget=0)


def test_the_longest_chain_starts_first() -> None:
    """Plan order would start a and b; c heads the longest chain (c then d), so it starts at once."""
    steps = [step("a"), step("b"), step("c"), step("d", "c")]
    runner = FakeRunner(estimates={}, durations={"a": 1.0, "b": 1.0, "c": 5.0, "d": 5.0})
    run_steps(runner, steps, jobs=2, budget=0)  # type: ignore[arg-type]
    first_two = sorted(runner.spans, key=lambda s: runner.spans[s][0])[:2]
    assert "c" in first_two and set(first_two) != {"a", "b"}


def test_the_cores_are_shared_out_among_the_steps_started_together() -> None:
    """Two steps started together get half the cores each (at least one thread); a step that starts alone, and
    so stays alone until it ends, gets them all."""
    assert step_threads(2, cores=2) == 1 and step_threads(1, cores=2) == 2 and step_threads(3, cores=2) == 1
    assert step_threads(2, cores=16) == 8
    steps = [step("a"), step("b"), step("c", "a", "b")]
    runner = FakeRunner(estimates={})
    run_steps(runner, steps, jobs=2, budget=0)  # type: ignore[arg-type]
    assert runner.threads == {"a": step_threads(2), "b": step_threads(2), "c": step_threads(1)}
    runner = FakeRunner(estimates={}, seconds=0.0)
    run_steps(runner, steps, jobs=1, budget=0)  # type: ignore[arg-type]
    assert set(runner.threads.values()) == {None}  # one job: torch's own default
