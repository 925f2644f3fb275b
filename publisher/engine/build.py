"""Run a plan: fetch -> convert/chunk -> (analyze) -> compress -> verify -> compile -> assemble -> zip, through the store.

Each step's output is keyed by its kind, its parameters, its inputs' keys, the code it runs and the tool versions, so
a rerun redoes only what changed, and a killed run resumes: finished steps are in the store, half-written ones never
are. The variant folders under `out/<repo>/` are the repo as it will be published.

The parts, one job each: `state.py` (what they share), `schedule.py` (which step runs when), `steps.py` (the step
table: what each kind runs), `references.py` (which verify steps share PyTorch outputs), `assemble.py` (variant
folders and build-info); process isolation is `convert/coreml.run_isolated`. This module runs one step through the
store and ties the parts together.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from publisher.compile import require_compiler
from publisher.engine.assemble import Assembler
from publisher.engine.references import References
from publisher.engine.schedule import duration_estimate, memory_budget, memory_estimate, run_steps, step_threads
from publisher.engine.state import (
    PACKAGE,
    BuildError,
    BuildOptions,
    BuildResult,
    BuildState,
    Fetched,
    VariantResult,
)
from publisher.engine.steps import StepActions
from publisher.errors import PublisherError
from publisher.family import family_named
from publisher.manifest import LoadedManifest
from publisher.plan import (
    AnalyzeParams,
    FetchParams,
    Plan,
    Step,
    Variant,
    build_plan,
    fetch_key,
    select_variants,
    stored_key,
)
from publisher.vocabulary import Component, Layout

__all__ = ["PACKAGE", "BuildError", "BuildOptions", "BuildResult", "VariantResult", "analyze_sources", "build",
           "run_steps", "step_threads"]


class _Runner:
    """One build: the shared state and the parts over it; what the scheduler calls."""

    def __init__(self, plan: Plan, options: BuildOptions, report: Callable[[str], None]) -> None:
        self.state = BuildState(plan, options, report)
        self.references = References(self.state)
        self.actions = StepActions(self.state, self.references)
        self.assembler = Assembler(self.state, self.run_step)

    def clean_leftovers(self) -> None:
        """Remove what killed builds left: half-written store entries, and the temp folders of isolated steps
        whose process is gone."""
        from publisher.convert.coreml import remove_stale_step_folders

        self.state.store.clean_temp()
        removed = remove_stale_step_folders()
        if removed:
            self.state.report(f"removed {removed} temp folder(s) of killed steps")

    def run_step(self, step: Step, threads: int | None = None) -> None:
        """Run one step (or take its stored output); `threads`: torch's threads in its isolated process."""
        self.state._local.threads = threads
        if step.id in self.state.failed:  # refused before it ran (a recipe checked against the fetched source)
            return
        broken = [i for i in step.inputs if i in self.state.failed]
        if broken:
            self.state.failed[step.id] = self.state.failed[broken[0]]
            return
        if step.kind == "fetch":
            self._fetch(step)
            return
        if step.kind == "assemble":
            return  # per variant, after its steps
        if step.kind == "evaluate" and not self.actions.evaluates(step):
            return  # not asked for, or not cheap here: the variant is assembled without it
        params = {**step.params_json(), **self.run_params(step)}  # also on the stored record
        key = stored_key(step, [self.state.input_key(i, step) for i in step.inputs], self.run_params(step))
        self.state.keys[step.id] = key
        stored = self.state.store.get(key)
        if stored is not None:
            self.state.outputs[step.id] = stored
            self.state.cached.append(step.id)
            return
        self.state.report(f"{step.kind} {step.label.split(':', 1)[1]}")
        try:
            with self.state.store.building(key, {"step": step.id, "kind": step.kind, "params": params}) as work:
                self.actions.table()[step.kind](step, work)
        except Exception as exc:
            # one line for the table (a tool's own failure: its type and last line); the whole traceback, the child
            # process's included (ProcessPoolExecutor chains it), for --debug
            text = str(exc).strip().splitlines()
            line = str(exc) if isinstance(exc, PublisherError) else \
                f"{type(exc).__name__}: {text[-1] if text else ''}"
            self.state.failed[step.id] = f"{step.kind} {step.label}: {line}"
            self.state.tracebacks[step.id] = "".join(traceback.format_exception(exc))
            return
        stored = self.state.store.get(key)
        if stored is None:
            raise BuildError(f"{step.id}: the stored output did not verify right after it was written")
        self.state.outputs[step.id] = stored
        self.state.built.append(step.id)

    def run_params(self, step: Step) -> dict[str, Any]:
        """What the build's options add to a step's parameters (and so to its key)."""
        if step.kind == "evaluate":
            return {"runtime": self.actions.evaluation_runtime()}
        return {"fidelity": self.state.options.verify} if step.kind == "verify" else {}

    def waits_for(self, step: Step, steps: Sequence[Step]) -> set[str]:
        return self.references.waits_for(step, steps)

    def memory_estimate(self, step: Step) -> int:
        return memory_estimate(self.state, step)

    def duration_estimate(self, step: Step) -> float:
        return duration_estimate(self.state, step)

    def assemble(self, variant: Variant, result: VariantResult) -> None:
        self.assembler.assemble(variant, result)
        if result.status == "failed":
            failed = next((s for s in self.state.variant_steps(variant) if s.id in self.state.tracebacks), None)
            result.traceback = self.state.tracebacks.get(failed.id) if failed is not None else None

    def _fetch(self, step: Step) -> None:
        from publisher.engine.source import fetch_source

        params = step.params
        assert isinstance(params, FetchParams)
        # the manifest's source: the components not read from an extra source
        components = family_named(params.family).ordered(
            c for v in self.state.plan.variants if v.id in step.variants for c in v.components if not v.role_of(c))
        if params.community:
            self._fetch_community(step, params, components)
            return
        try:
            fetched = fetch_source(params.repo, params.revision, components,
                                   self.state.options.store / "hub-cache", endpoint=self.state.options.endpoint,
                                   token=self.state.options.token, weights=params.weights, family=params.family,
                                   extra=(params.folders, params.into) if params.role else None)
        except PublisherError as exc:
            self.state.failed[step.id] = str(exc)
            return
        for warning in fetched.warnings:
            self.state.report(f"warning: {warning}")
        # the commit and the weights setting decide every component's files (the choice is a function of both)
        key = fetch_key(fetched.repo, fetched.commit, params)
        self.state.keys[step.id] = key
        self.state.fetched[step.id] = Fetched(key, fetched.path, fetched.commit, fetched.repo, fetched.revision,
                                              {f.path: f.to_json() for f in fetched.files})
        self._check_recipes(step)

    def _fetch_community(self, step: Step, params: FetchParams, components: list[Component]) -> None:
        """A single-file checkpoint and/or LoRAs: fetched, checked and prepared (engine/community.py)."""
        from publisher.engine.community import fetch_community

        try:
            fetched = fetch_community(self.state, params, components)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            self.state.failed[step.id] = str(exc) if isinstance(exc, PublisherError) else \
                f"fetch {step.label}: {type(exc).__name__}: {text[-1] if text else ''}"
            self.state.tracebacks[step.id] = "".join(traceback.format_exception(exc))
            return
        self.state.keys[step.id] = fetched.key
        self.state.fetched[step.id] = fetched
        self._check_recipes(step)

    def _check_recipes(self, fetch: Step) -> None:
        """A recipe in Apple's layout is checked against the fetched source's UNet (its module names, from the
        config alone) before anything converts: one that names modules the UNet lacks fails its variants' steps
        that no other variant needs, with one line."""
        from publisher.compress.sensitivity import unet_weight_names, unknown_modules

        plan = self.state.plan
        for analyze in plan.steps_of("analyze"):
            if fetch.id not in analyze.inputs or not isinstance(analyze.params, AnalyzeParams) or \
                    "apple_recipe" not in analyze.params.settings:
                continue
            names = unet_weight_names(self.state.fetched[fetch.id].path, analyze.params.family)
            message = unknown_modules((name for name, _ in analyze.params.settings["apple_recipe"]), names)
            if message is None:
                continue
            doomed = set(analyze.variants)
            for other in plan.steps.values():
                if other.kind != "fetch" and other.variants and set(other.variants) <= doomed:
                    self.state.failed.setdefault(other.id, message)


def build(manifests: Sequence[LoadedManifest], options: BuildOptions,
          report: Callable[[str], None] | None = None) -> BuildResult:
    """Build the selected variants of the manifests. Failures are per variant (see BuildResult.ok)."""
    from tqdm import tqdm

    plan = build_plan(manifests, options.namespace)
    chosen = select_variants(plan, options.variants)
    ids = {v.id for v in chosen}
    needs_compiler = options.compile and any(Layout.COMPILED in v.layouts for v in chosen)
    if needs_compiler:
        require_compiler()
    runner = _Runner(plan, options, report or (lambda _: None))
    runner.clean_leftovers()
    steps = [s for s in plan.steps.values() if ids & set(s.variants) and s.kind not in ("assemble", "zip")
             and (options.compile or s.kind != "compile")]
    with tqdm(total=len(steps), desc="build", unit="step", disable=not options.progress) as bar:
        def started(step: Step) -> None:
            bar.set_postfix_str(f"{step.kind} {getattr(step.params, 'component', getattr(step.params, 'repo', ''))}"
                                [:40])

        jobs = options.jobs if options.isolate else 1  # steps in this process: one at a time
        run_steps(runner, steps, jobs, memory_budget() if jobs > 1 else 0, started, lambda _: bar.update())
    results = []
    for variant in chosen:
        result = VariantResult(variant)
        runner.assemble(variant, result)
        results.append(result)
    return BuildResult(plan=plan, variants=results, built=runner.state.built, cached=runner.state.cached)


@dataclass
class AnalysisResult:
    source: str  # repo@revision
    step: str
    path: Path  # the stored analysis folder (analysis.json, pre-analysis.json)
    status: str  # built | cached


def analyze_sources(manifests: Sequence[LoadedManifest], options: BuildOptions,
                    report: Callable[[str], None] | None = None) -> list[AnalysisResult]:
    """Run the plan's mixed-bit analyses (fetching their sources) through the store, nothing else. A source that
    no variant analyses gets one with default settings (per-tensor LUTs, no target), so that its curve can be
    looked at before a target is chosen."""
    from publisher.compress.palettize_scheme import SCHEME as PALETTIZE

    plan = build_plan(manifests, options.namespace)
    chosen = {v.id for v in select_variants(plan, options.variants)}
    runner = _Runner(plan, options, report or (lambda _: None))
    runner.clean_leftovers()
    fetches = [s for s in plan.steps_of("fetch") if chosen & set(s.variants)]
    analyses = [s for s in plan.steps_of("analyze") if chosen & set(s.variants)]
    for fetch in fetches:
        if any(fetch.id in s.inputs for s in analyses):
            continue
        variant = next(v for v in plan.variants if v.id in fetch.variants)
        step = Step(f"analyze:{fetch.id.removeprefix('fetch:')}:unet:{variant.resolution}:{PALETTIZE.name}:default",
                    "analyze", (fetch.id,), AnalyzeParams(PALETTIZE.name, Component.UNET.value, variant.resolution,
                                                          {"granularity": "per_tensor"}), list(fetch.variants))
        plan.steps[step.id] = step
        analyses.append(step)
    results = []
    for step in analyses:
        runner.run_step(plan.steps[step.inputs[0]])
        runner.run_step(step)
        if step.id in runner.state.failed:
            raise BuildError(runner.state.failed[step.id])
        results.append(AnalysisResult(step.inputs[0].removeprefix("fetch:"), step.id, runner.state.outputs[step.id].path,
                                      "built" if step.id in runner.state.built else "cached"))
    return results
