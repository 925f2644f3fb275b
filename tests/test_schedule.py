"""The build's step scheduler: inputs first, at most `jobs` at once, estimated peaks within the memory budget."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from publisher.engine.build import BuildError, run_steps, step_threads
from publisher.plan import ConvertParams, Step


@dataclass
class FakeRunner:
    """Steps that do nothing; what ran beside what is read off the scheduler's own events (`started` and
    `finished` are called in its thread, a step's finish only after its work returned), not off sleeps."""

    estimates: dict[str, int]
    extra_waits: dict[str, set[str]] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # ("start" | "end", step id), in order
    in_flight: set[str] = field(default_factory=set)
    beside: list[set[str]] = field(default_factory=list)  # the steps in flight as each one started
    ran: set[str] = field(default_factory=set)
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
        with self.lock:
            assert step.id in self.in_flight, f"{step.id} ran without being started"
            self.threads[step.id] = threads
            self.ran.add(step.id)

    def started(self, step: Step) -> None:
        self.events.append(("start", step.id))
        self.in_flight.add(step.id)
        self.beside.append(set(self.in_flight))

    def finished(self, step: Step) -> None:
        assert step.id in self.ran, f"{step.id} finished before its work ran"
        self.events.append(("end", step.id))
        self.in_flight.discard(step.id)

    def run(self, steps: Sequence[Step], jobs: int, budget: int) -> None:
        run_steps(self, steps, jobs, budget, self.started, self.finished)  # type: ignore[arg-type]

    def at(self, kind: str, step_id: str) -> int:
        return self.events.index((kind, step_id))

    @property
    def order(self) -> list[str]:
        return [name for kind, name in self.events if kind == "start"]


def step(name: str, *inputs: str) -> Step:
    return Step(name, "convert", tuple(inputs), ConvertParams("unet", None, 512, "iOS16"), [])


def test_inputs_finish_before_their_readers_start_and_jobs_bound_the_overlap() -> None:
    steps = [step("a"), step("b"), step("c", "a"), step("d", "a", "b"), step("e", "c", "d"), step("f")]
    runner = FakeRunner(estimates={})
    runner.run(steps, jobs=2, budget=0)
    assert runner.ran == {s.id for s in steps}
    for s in steps:
        for source in s.inputs:
            assert runner.at("end", source) < runner.at("start", s.id), (source, s.id)
    assert max(len(group) for group in runner.beside) == 2  # it did run two at once, never three
    # the extra order a runner asks for (a verify step after the one that computes its float reference)
    runner = FakeRunner(estimates={}, extra_waits={"b": {"a"}})
    runner.run([step("a"), step("b")], jobs=2, budget=0)
    assert runner.at("end", "a") < runner.at("start", "b")
    # without it, the two run side by side
    runner = FakeRunner(estimates={})
    runner.run([step("a"), step("b")], jobs=2, budget=0)
    assert {"a", "b"} in runner.beside


def test_memory_budget_keeps_heavy_steps_apart_and_lets_light_ones_through() -> None:
    gib = 1 << 30
    steps = [step("unet-1"), step("unet-2"), step("vae"), step("text")]
    runner = FakeRunner(estimates={"unet-1": 8 * gib, "unet-2": 8 * gib, "vae": 2 * gib, "text": 1 * gib})
    runner.run(steps, jobs=2, budget=12 * gib)
    for group in runner.beside:
        assert not {"unet-1", "unet-2"} <= group
        if len(group) > 1:
            assert sum(runner.estimates[s] for s in group) <= 12 * gib
    assert any(len(group) == 2 for group in runner.beside)  # a light step ran beside a heavy one
    # a step heavier than the whole budget still runs, alone
    runner = FakeRunner(estimates={"big": 20 * gib, "small": gib})
    runner.run([step("big"), step("small")], jobs=2, budget=12 * gib)
    assert all(len(group) == 1 for group in runner.beside) and runner.ran == {"big", "small"}


def test_one_job_is_plan_order() -> None:
    steps = [step("b"), step("a"), step("c", "a")]
    runner = FakeRunner(estimates={})
    runner.run(steps, jobs=1, budget=0)
    assert runner.order == ["b", "a", "c"]


def test_a_step_waiting_for_a_step_not_run_is_an_error() -> None:
    with pytest.raises(BuildError, match="waits for a step that is not run"):
        run_steps(FakeRunner(estimates={}, extra_waits={"a": {"missing"}}), [step("a")], jobs=2,  # type: ignore[arg-type]
                  budget=0)


def test_the_longest_chain_starts_first() -> None:
    """Plan order would start a and b; c heads the longest chain (c then d), so it starts at once."""
    steps = [step("a"), step("b"), step("c"), step("d", "c")]
    runner = FakeRunner(estimates={}, durations={"a": 1.0, "b": 1.0, "c": 5.0, "d": 5.0})
    runner.run(steps, jobs=2, budget=0)
    first_two = runner.order[:2]
    assert "c" in first_two and set(first_two) != {"a", "b"}


def test_the_cores_are_shared_out_among_the_steps_started_together() -> None:
    """Two steps started together get half the cores each (at least one thread); a step that starts alone, and
    so stays alone until it ends, gets them all."""
    assert step_threads(2, cores=2) == 1 and step_threads(1, cores=2) == 2 and step_threads(3, cores=2) == 1
    assert step_threads(2, cores=16) == 8
    steps = [step("a"), step("b"), step("c", "a", "b")]
    runner = FakeRunner(estimates={})
    runner.run(steps, jobs=2, budget=0)
    assert runner.threads == {"a": step_threads(2), "b": step_threads(2), "c": step_threads(1)}
    runner = FakeRunner(estimates={})
    runner.run(steps, jobs=1, budget=0)
    assert set(runner.threads.values()) == {None}  # one job: torch's own default
