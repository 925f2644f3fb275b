"""Run a plan: fetch -> convert/chunk -> (analyze) -> compress -> verify -> compile -> assemble -> zip, through the store.

Each step's output is keyed by the hash of its inputs, its parameters and the tool versions, so a rerun redoes only
what changed, and a killed run resumes: finished steps are in the store, half-written ones never are. The variant
folders under `out/<repo>/` are the repo as it will be published.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from publisher.build_info import BUILD_INFO, BuildInfo, write_build_info
from publisher.compile import compile_package, require_compiler
from publisher.compress.recipe import APPLE_PRE_ANALYSIS, pre_analysis_name
from publisher.compress.scheme import REPORT, CompressContext, scheme_named
from publisher.contract import package_name, zip_folder_name
from publisher.errors import PublisherError
from publisher.family import family_named
from publisher.layout import link_or_copy, link_tree, replace_folder, write_zip
from publisher.manifest import (
    Attention,
    Component,
    DeploymentTarget,
    Layout,
    LoadedManifest,
)
from publisher.plan import (
    AnalyzeParams,
    ChunkParams,
    CompressParams,
    ConvertParams,
    FetchParams,
    Plan,
    Step,
    Variant,
    VerifyParams,
    ZipParams,
    build_plan,
    fetch_key,
    select_variants,
    step_tools,
)
from publisher.store import (
    BuildStore,
    Stamp,
    StoredOutput,
    sha256_file,
    stamp_of,
    step_key,
    tool_versions,
    tree_files,
)
from publisher.util.atomic import atomic_write_bytes, atomic_write_text
from publisher.util.hashing import json_sha256
from publisher.verify.fidelity import REFERENCE, Reference

PACKAGE = "model.mlpackage"


class BuildError(PublisherError):
    """A step failed; the message names the step and the reason."""


@dataclass
class BuildOptions:
    out: Path = Path("build")
    store: Path = Path(".publisher/store")
    namespace: str = "local"
    compile: bool = True
    verify: bool = True
    variants: Sequence[str] | None = None  # variant ids or fnmatch patterns
    endpoint: str | None = None  # the Hub the sources are read from (None: HF_ENDPOINT / huggingface.co)
    token: str | None = None
    isolate: bool = True  # convert each component in its own process
    jobs: int = 1  # steps run at once (isolated builds only), each started only within the memory budget
    verify_store: bool = False  # re-hash every stored output instead of trusting unchanged stamps
    progress: bool = True


@dataclass
class VariantResult:
    variant: Variant
    status: str = "pending"  # built | cached | failed
    files: int = 0
    size: int = 0
    seconds: float = 0.0
    path: Path | None = None
    error: str | None = None


@dataclass
class BuildResult:
    plan: Plan
    variants: list[VariantResult]
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.status != "failed" for v in self.variants)


@dataclass
class _Fetched:
    key: str
    path: Path
    commit: str
    repo: str
    revision: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> size, sha256 of what was downloaded


class _Runner:
    def __init__(self, plan: Plan, options: BuildOptions, report: Callable[[str], None]) -> None:
        self.plan = plan
        self.options = options
        self.store = BuildStore(options.store, verify=options.verify_store)
        self.versions = tool_versions()
        self.keys: dict[str, str] = {}
        self.outputs: dict[str, StoredOutput] = {}
        self.fetched: dict[str, _Fetched] = {}
        self.failed: dict[str, str] = {}
        self.built: list[str] = []
        self.cached: list[str] = []
        self.report = report
        # (source, submodule, resolution, family) -> saved float reference (a few MB): one PyTorch run per build
        self.float_references: dict[tuple[str, str, int, str], bytes] = {}
        # the same key -> the references of its compressed packages by the digest of their decoded weights
        self.decoded_references: dict[tuple[str, str, int, str], dict[str, bytes]] = {}
        self._local = threading.local()  # per worker thread of run_steps: the running step's torch threads

    def _run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A heavy step's work: in a process of its own (isolate), with the torch threads the step was given;
        else in this process."""
        if not self.options.isolate:
            return function(*args, **kwargs)
        from publisher.convert.coreml import run_isolated

        return run_isolated(function, *args, threads=getattr(self._local, "threads", None), **kwargs)

    def clean_leftovers(self) -> None:
        """Remove what killed builds left: half-written store entries, and the temp folders of isolated steps
        whose process is gone."""
        from publisher.convert.coreml import remove_stale_step_folders

        self.store.clean_temp()
        removed = remove_stale_step_folders()
        if removed:
            self.report(f"removed {removed} temp folder(s) of killed steps")

    # -- steps ---------------------------------------------------------------------------------------------

    def run_step(self, step: Step, threads: int | None = None) -> None:
        """Run one step (or take its stored output); `threads`: torch's threads in its isolated process."""
        self._local.threads = threads
        broken = [i for i in step.inputs if i in self.failed]
        if broken:
            self.failed[step.id] = self.failed[broken[0]]
            return
        if step.kind == "fetch":
            self._fetch(step)
            return
        if step.kind == "assemble":
            return  # per variant, after its steps
        params = {**step.params_json(), **self.run_params(step)}
        key = step_key(step.kind, params, [self.keys[i] for i in step.inputs], step_tools(step))
        self.keys[step.id] = key
        stored = self.store.get(key)
        if stored is not None:
            self.outputs[step.id] = stored
            self.cached.append(step.id)
            return
        self.report(f"{step.kind} {step.label.split(':', 1)[1]}")
        try:
            with self.store.building(key, {"step": step.id, "kind": step.kind, "params": params}) as work:
                self._actions()[step.kind](step, work)
        except PublisherError as exc:
            self.failed[step.id] = f"{step.kind} {step.id}: {exc}"
            return
        except Exception as exc:  # a tool's own failure: keep the step name and the message, one line
            text = str(exc).strip().splitlines()
            self.failed[step.id] = f"{step.kind} {step.id}: {type(exc).__name__}: {text[-1] if text else ''}"
            return
        stored = self.store.get(key)
        if stored is None:
            raise BuildError(f"{step.id}: the stored output did not verify right after it was written")
        self.outputs[step.id] = stored
        self.built.append(step.id)

    def run_params(self, step: Step) -> dict[str, Any]:
        """What the build's options add to a step's parameters (and so to its key)."""
        return {"fidelity": self.options.verify} if step.kind == "verify" else {}

    def waits_for(self, step: Step, steps: Sequence[Step]) -> set[str]:
        """The steps among `steps` this one must follow: its inputs, and for a verify step that reuses a float
        reference (below), the first verify step of its group, which computes it."""
        ids = {s.id for s in steps}
        before = {i for i in step.inputs if i in ids}
        group = self._float_reference_group(step)
        if group is not None:
            producer = next((s for s in steps if self._float_reference_group(s) == group and not self._is_chunk(s)),
                            None)
            if producer is not None and producer.id != step.id:
                before.add(producer.id)
            compression = self._compression_of(step)
            if compression is not None:  # the first package compressed alike may share its decoded reference
                first = next(s for s in steps if self._float_reference_group(s) == group
                             and self._compression_of(s) == compression)
                if first.id != step.id:
                    before.add(first.id)
        return before

    def _compression_of(self, step: Step) -> tuple[str, str] | None:
        """A verify step's package's compression (scheme, settings), None for a float16 package."""
        package = self.plan.steps.get(step.inputs[0]) if step.inputs else None
        if package is None or not isinstance(package.params, CompressParams):
            return None
        return package.params.scheme, json.dumps(package.params.settings, sort_keys=True)

    def _is_chunk(self, step: Step) -> bool:
        return isinstance(step.params, VerifyParams) and \
            self._variant_of(step).model_family.chunk_index(step.params.submodule) is not None

    def _float_reference_group(self, step: Step) -> tuple[Any, ...] | None:
        """Verify steps with the same group share one float forward (see _do_verify): those of a component and of
        its chunks. None: not a verify step."""
        if step.kind != "verify" or not isinstance(step.params, VerifyParams):
            return None
        variant = self._variant_of(step)
        return (tuple(self._fetches_of(step)), step.params.component, variant.resolution, variant.family)

    def memory_estimate(self, step: Step) -> int:
        """A heavy step's expected peak (bytes), from its component's weights in the source; 0 for the rest."""
        if step.kind not in HEAVY_KINDS:
            return 0
        return MEMORY_FIXED_BYTES + int(MEMORY_PER_WEIGHT_BYTE * self._weight_bytes(step))

    def duration_estimate(self, step: Step) -> float:
        """A heavy step's expected duration in arbitrary units (weight bytes x a factor per kind and attention)."""
        if step.kind not in DURATION_PER_WEIGHT_BYTE:
            return 0.0
        attention = getattr(step.params, "attention", None)
        if step.kind == "verify":
            attention = self._variant_of(step).attention.value
        return DURATION_PER_WEIGHT_BYTE[step.kind] * ATTENTION_DURATION.get(attention or "", 1.0) * \
            self._weight_bytes(step)

    def _weight_bytes(self, step: Step) -> int:
        """The float32 size of the step's component's weights in its fetched source (0 before the fetch)."""
        component = getattr(step.params, "component", None)
        variant = self._variant_of(step)
        folder = variant.model_family.component(Component(component)).folder if component else None
        weights = 0
        for fetch in self._fetches_of(step):
            if fetch not in self.fetched:
                continue
            for name, entry in self.fetched[fetch].files.items():
                if folder and name.startswith(f"{folder}/") and name.endswith((".safetensors", ".bin")):
                    weights += int(entry.get("size", 0)) * (2 if ".fp16." in name else 1)  # loaded as float32
        return weights

    def _actions(self) -> dict[str, Callable[[Step, Path], None]]:
        """What each stored step kind runs (fetch and assemble are handled apart: they are not stored)."""
        return {"convert": self._do_convert, "chunk": self._do_chunk, "analyze": self._do_analyze,
                "compress": self._do_compress, "verify": self._do_verify, "compile": self._do_compile,
                "zip": self._do_zip}

    def _variant_of(self, step: Step) -> Variant:
        return next(v for v in self.plan.variants if v.id in step.variants)

    def _fetch(self, step: Step) -> None:
        from publisher.engine.source import fetch_source

        params = step.params
        assert isinstance(params, FetchParams)
        # the manifest's source: the components not read from an extra source
        components = sorted({c for v in self.plan.variants if v.id in step.variants for c in v.components
                             if not v.role_of(c)}, key=lambda c: list(Component).index(c))
        try:
            fetched = fetch_source(params.repo, params.revision, components,
                                   self.options.store / "hub-cache", endpoint=self.options.endpoint,
                                   token=self.options.token, weights=params.weights, family=params.family,
                                   extra=(params.folders, params.into) if params.role else None)
        except PublisherError as exc:
            self.failed[step.id] = str(exc)
            return
        for warning in fetched.warnings:
            self.report(f"warning: {warning}")
        # the commit and the weights setting decide every component's files (the choice is a function of both)
        key = fetch_key(fetched.repo, fetched.commit, params)
        self.keys[step.id] = key
        self.fetched[step.id] = _Fetched(key, fetched.path, fetched.commit, fetched.repo, fetched.revision,
                                         {f.path: f.to_json() for f in fetched.files})

    def _fetches_of(self, step: Step) -> list[str]:
        """The fetch steps a step's package comes from (through compress and verify steps to the conversion)."""
        while not any(self.plan.steps[i].kind == "fetch" for i in step.inputs):
            step = self.plan.steps[step.inputs[0]]
        return [i for i in step.inputs if self.plan.steps[i].kind == "fetch"]

    def _source(self, step: Step) -> _Fetched:
        """The source a step's component is read from (its extra source, if it has one)."""
        return self.fetched[self._fetches_of(step)[-1]]

    def _source_path(self, step: Step) -> Path:
        """The folder a step loads from: the fetched source, or, for a component from an extra source, one
        folder with both (the manifest's source holds the configs the dimensions are read from)."""
        from publisher.engine.source import compose_sources

        fetches = self._fetches_of(step)
        if len(fetches) == 1:
            return self.fetched[fetches[0]].path
        return compose_sources([self.fetched[f].path for f in fetches], self.options.store / "hub-cache")

    def _metadata(self, step: Step) -> Any:
        from publisher.convert.coreml import PackageMetadata

        source = self._source(step)
        assert isinstance(step.params, ConvertParams)
        attention = step.params.attention
        return PackageMetadata(source=f"{source.repo}@{source.commit}", license=step.params.license,
                               attention=Attention(attention) if attention else None)

    def _do_convert(self, step: Step, work: Path) -> None:
        from publisher.convert.coreml import convert_component

        p = step.params
        assert isinstance(p, ConvertParams)
        # a component no attention implementation changes is converted as it is (the stock modules)
        attention = Attention(p.attention or Attention.ORIGINAL)
        self._run(convert_component, self._source_path(step), Component(p.component), attention, p.resolution,
                  DeploymentTarget(p.deployment_target), work / PACKAGE, self._metadata(step), family=p.family)

    def _do_chunk(self, step: Step, work: Path) -> None:
        from publisher.convert.chunk import convert_unet_chunks

        p = step.params
        assert isinstance(p, ChunkParams) and p.attention is not None
        outputs = (work / PACKAGE, None) if family_named(p.family).chunk_index(p.chunk) == 0 else (None, work / PACKAGE)
        args = (self._source_path(step), Attention(p.attention), p.resolution, DeploymentTarget(p.deployment_target),
                outputs, self._metadata(step), p.family, Component(p.component))
        self._run(convert_unet_chunks, *args)

    def _do_analyze(self, step: Step, work: Path) -> None:
        from publisher.verify.sensitivity import analyze_to_folder

        p = step.params
        assert isinstance(p, AnalyzeParams)
        self._run(analyze_to_folder, self._source_path(step), Component(p.component), p.resolution, p.settings,
                  self._variant_of(step).source_repo, work, self.options.progress, p.family)

    def _do_compress(self, step: Step, work: Path) -> None:
        p = step.params
        assert isinstance(p, CompressParams)
        scheme = scheme_named(p.scheme)
        settings = scheme.settings_model.model_validate(p.settings)
        analysis = self.outputs[step.inputs[1]].path if len(step.inputs) > 1 else None
        context = CompressContext(deployment_target=DeploymentTarget(p.deployment_target), component=p.component,
                                  inputs=p.inputs, analysis=analysis, progress=self.options.progress)
        report = scheme.apply(self.outputs[step.inputs[0]].path / PACKAGE, work / PACKAGE, settings, context)
        report["scheme"] = scheme.name
        atomic_write_text(work / REPORT, json.dumps(report, indent=2, sort_keys=True) + "\n")

    def _do_verify(self, step: Step, work: Path) -> None:
        from publisher.convert.components import source_dims
        from publisher.verify.contract import contract_problems

        variant = self._variant_of(step)
        source = self._source_path(step)
        dims = source_dims(source, variant.resolution, variant.family)
        package = self.outputs[step.inputs[0]].path / PACKAGE
        assert isinstance(step.params, VerifyParams)
        submodule = step.params.submodule
        problems = contract_problems(package, submodule, dims, variant.family)
        if problems:
            raise BuildError(f"{submodule} breaks the apps' contract: {'; '.join(problems)}")
        report: dict[str, Any] = {"contract": "ok"}
        if self.options.verify:
            from publisher.verify.fidelity import PSNR_BAR_DB, reference_and_check

            package_step = self.plan.steps[step.inputs[0]]
            compressed = package_step.kind == "compress"
            float16 = self.outputs[package_step.inputs[0]].path / PACKAGE if compressed else None
            scheme = package_step.params.scheme if isinstance(package_step.params, CompressParams) else None
            # the PyTorch side once, here: stored with the step for every later check (the macOS runner's Core ML
            # run included), so that no other machine loads a PyTorch model to verify this package. It runs in a
            # process of its own (isolate), the PyTorch model dropped before the executor starts: the build's own
            # process never holds a model.
            # The float model's outputs depend on the weights and the seeded inputs, not on the attention
            # implementation or the compression: computed once per build (ORIGINAL attention) and shared by every
            # package of that submodule. The first verify step of a component computes them (run_steps orders the
            # rest after it), cut in two where the plan also verifies the component's chunks: the same forward
            # gives each chunk its inputs and outputs.
            def key(name: str) -> tuple[str, str, int, str]:
                return (str(source), name, variant.resolution, variant.family)

            floats = work / "float-reference.npz"
            known = fresh = None
            chunks: dict[str, Path] = {}
            if key(submodule) in self.float_references:
                atomic_write_bytes(floats, self.float_references[key(submodule)])
                known = floats
            elif not self._is_chunk(step):
                fresh = floats
                group = self._float_reference_group(step)
                chunks = {s.params.submodule: work / f"float-reference-{s.params.submodule}.npz"
                          for s in self.plan.steps.values() if isinstance(s.params, VerifyParams)
                          and self._is_chunk(s) and self._float_reference_group(s) == group}
            # a compressed package whose decoded weights equal an earlier one's (the same weights under another
            # attention implementation) is held to that one's PyTorch outputs
            decoded: dict[str, Path] = {}
            if compressed:
                for digest, data in self.decoded_references.get(key(submodule), {}).items():
                    decoded[digest] = work / f"decoded-reference-{digest[:16]}.npz"
                    atomic_write_bytes(decoded[digest], data)
            fidelity = self._run(reference_and_check, package, source, submodule, variant.attention,
                                 variant.resolution, float16, scheme, work / REFERENCE, variant.family, known, fresh,
                                 chunks or None, decoded or None)
            if fresh is not None:
                self.float_references[key(submodule)] = fresh.read_bytes()
            for name, path in chunks.items():
                self.float_references[key(name)] = path.read_bytes()
                path.unlink()
            for path in decoded.values():
                path.unlink()
            floats.unlink(missing_ok=True)
            if compressed:
                digest = Reference.load(work / REFERENCE).weights_digest
                if digest is not None:
                    self.decoded_references.setdefault(key(submodule), {})[digest] = (work / REFERENCE).read_bytes()
            report["fidelity"] = fidelity.to_json()
            if not fidelity.passed:
                raise BuildError(f"{submodule}: output PSNR {fidelity.min_psnr_db:.1f} dB is under the "
                                 f"{PSNR_BAR_DB:.0f} dB bar: not published")
        link_tree(package, work / PACKAGE)
        atomic_write_text(work / "verify.json", json.dumps(report, indent=2, sort_keys=True) + "\n")

    def _do_compile(self, step: Step, work: Path) -> None:
        compiled = compile_package(self.outputs[step.inputs[0]].path / PACKAGE, work)
        if compiled.name != "model.mlmodelc":
            compiled.rename(work / "model.mlmodelc")

    def _do_zip(self, step: Step, work: Path) -> None:
        assert isinstance(step.params, ZipParams)
        variant = self._variant_of(step)
        resources = self.options.out / variant.repo_id / variant.attention.folder / "compiled"
        write_zip(resources, work / "archive.zip", zip_folder_name(variant.repo_name, variant.attention))

    # -- variants ------------------------------------------------------------------------------------------

    def variant_steps(self, variant: Variant) -> list[Step]:
        return [s for s in self.plan.steps.values() if variant.id in s.variants]

    def assemble(self, variant: Variant, result: VariantResult) -> None:
        steps = self.variant_steps(variant)
        failures = [self.failed[s.id] for s in steps if s.id in self.failed]
        unmatched = self._unmatched_recipe_names(steps)
        if unmatched:
            failures.append(f"{variant.id}: the recipe names {len(unmatched)} op(s) that match no weight of the "
                            f"variant's packages: {', '.join(unmatched[:5])}{', ...' if len(unmatched) > 5 else ''}")
        if failures:
            result.status, result.error = "failed", failures[0]
            return
        # by role: "" the manifest's source, the rest its extra sources
        extra_sources = {s.params.role: self.fetched[s.id] for s in steps if isinstance(s.params, FetchParams)}
        source = extra_sources.pop("")
        repo_dir = self.options.out / variant.repo_id
        folder = repo_dir / variant.attention.folder
        staged = Path(tempfile.mkdtemp(prefix=f".{variant.attention.folder}.", dir=repo_dir if repo_dir.exists()
                                       else _mkdir(repo_dir)))
        try:
            fidelity: dict[str, Any] = {}
            references: dict[str, str] = {}
            compiled_layout = Layout.COMPILED in variant.layouts and self.options.compile
            verify_steps = [s for s in steps if s.kind == "verify"]
            for verify in verify_steps:
                assert isinstance(verify.params, VerifyParams)
                submodule = verify.params.submodule
                stored = self.outputs[verify.id]
                if Layout.PACKAGES in variant.layouts:
                    link_tree(stored.path / PACKAGE, staged / "packages" / package_name(
                        variant.source_repo.replace("/", "_"), submodule))
                figures = self._compression_figures(verify)
                if (stored.path / REFERENCE).exists():
                    references[submodule] = stored.key  # where `publisher verify` finds it in the store
                checked = json.loads((stored.path / "verify.json").read_text()).get("fidelity")
                if checked:
                    figures["output_psnr_db"] = checked["min_psnr_db"]
                    if "psnr_vs_float_db" in checked:
                        figures["output_psnr_vs_float_db"] = min(checked["psnr_vs_float_db"].values())
                if figures:
                    fidelity[submodule] = figures
                compile_step = next((s for s in steps if s.kind == "compile" and s.inputs[0] == verify.id), None)
                if compiled_layout and compile_step is not None:  # a chunked variant's whole UNet: packages only
                    link_tree(self.outputs[compile_step.id].path / "model.mlmodelc",
                              staged / "compiled" / variant.model_family.compiled_name(submodule))
            for analyze in (s for s in steps if s.kind == "analyze"):
                # the analysis behind the variant's recipe, in the layout of Apple's pre-analysis script (its
                # apply script takes it with --selected-recipe)
                link_or_copy(self.outputs[analyze.id].path / APPLE_PRE_ANALYSIS,
                             staged / pre_analysis_name(variant.source_repo))
            if compiled_layout:
                for name in variant.model_family.tokenizer_files:
                    link_or_copy(source.path / "tokenizer" / name, staged / "compiled" / name)
            replace_folder(staged, folder)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        zip_path = repo_dir / variant.zip_name
        zip_step = next((s for s in steps if s.kind == "zip"), None)
        known = self._vouched(steps)  # the folder holds hard links of stored files: their hashes are on record
        if zip_step is not None and compiled_layout:
            # the zip is keyed by the content of the Resources it holds
            assemble_step = next(s for s in steps if s.kind == "assemble")
            resources = tree_files(folder / "compiled", known)
            self.keys[assemble_step.id] = step_key("assemble", {"resources": resources}, [], {})
            self.run_step(zip_step)
            if zip_step.id in self.failed:
                result.status, result.error = "failed", self.failed[zip_step.id]
                return
            zip_path.unlink(missing_ok=True)
            link_or_copy(self.outputs[zip_step.id].path / "archive.zip", zip_path)
        files = tree_files(folder, known)
        if zip_path.exists() and zip_step is not None and compiled_layout:
            info = zip_path.stat()  # a hard link of the zip step's output: its hash is on that record
            digest = self.outputs[zip_step.id].vouched().get(stamp_of(info)) or sha256_file(zip_path)
            files[f"../{variant.zip_name}"] = (digest, info.st_size)
        seconds = sum(self.outputs[s.id].seconds for s in steps if s.id in self.outputs)
        info = BuildInfo.model_validate({
            "variant": variant.to_json(),
            "source": {"repo": source.repo, "revision": source.revision, "commit": source.commit,
                       "files": {name: entry for name, entry in sorted(source.files.items())
                                 if name.split("/")[0] in self._folders_of(variant)}},
            "extra_sources": {role: {"repo": f.repo, "revision": f.revision, "commit": f.commit,
                                     "files": dict(sorted(f.files.items()))}
                              for role, f in sorted(extra_sources.items())},
            # this variant's settings, hashed: editing another variant of the manifest leaves this file alone
            "manifest": {"name": variant.manifest_name, "variant_sha256": json_sha256(variant.to_json())},
            "tools": self.versions,
            "compiled": compiled_layout,
            "files": {name: {"sha256": sha, "size": size} for name, (sha, size) in sorted(files.items())},
            "fidelity": fidelity,
            "references": references,
            "build_seconds": round(seconds, 1),
        })
        write_build_info(folder / BUILD_INFO, info)
        built_here = any(s.id in self.built for s in steps)
        result.status = "built" if built_here else "cached"
        result.files = len(files) + 1
        result.size = sum(size for _, size in files.values())
        result.seconds = round(seconds, 1)
        result.path = folder

    def _unmatched_recipe_names(self, steps: Sequence[Step]) -> list[str]:
        """The names of a variant's recipe that no compressed package of it answers to (each compress step reports
        those it did not match; a name counts once every component has missed it)."""
        missed: set[str] | None = None
        for step in steps:
            if step.kind == "compress" and step.id in self.outputs:
                report = json.loads((self.outputs[step.id].path / REPORT).read_text())
                if "recipe_unmatched" in report:
                    names = set(report["recipe_unmatched"])
                    missed = names if missed is None else missed & names
        return sorted(missed or ())

    def _vouched(self, steps: Sequence[Step]) -> dict[Stamp, str]:
        known: dict[Stamp, str] = {}
        for step in steps:
            if step.id in self.outputs:
                known.update(self.outputs[step.id].vouched())
        return known

    @staticmethod
    def _folders_of(variant: Variant) -> set[str]:
        """The source's top-level entries a variant's packages come from."""
        return {"model_index.json", "tokenizer", *variant.model_family.source_folders(variant.components)}

    def _compression_figures(self, verify: Step) -> dict[str, Any]:
        """What the scheme that compressed this package puts on record (nothing for an uncompressed one)."""
        package_step = self.plan.steps[verify.inputs[0]]
        if not isinstance(package_step.params, CompressParams):
            return {}
        report = json.loads((self.outputs[package_step.id].path / REPORT).read_text())
        return {k: v for k, v in scheme_named(package_step.params.scheme).figures(report).items() if v is not None}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# What a heavy step's process peaks at, per byte of its component's float32 weights (measured at full size: the
# SD 1.5 UNet's conversion 1.3x, the palettized UNet's verification 1.8x, the SDXL UNet's conversion 1.35x), plus a
# fixed part (the libraries, the inputs, the executor's activations).
MEMORY_PER_WEIGHT_BYTE = 2.0
MEMORY_FIXED_BYTES = 1 << 30
HEAVY_KINDS = frozenset({"convert", "chunk", "analyze", "compress", "verify"})
# A step's expected duration per byte of its component's weights, relative to verifying it (measured at full size:
# the SD 1.5 UNet converts in ~70 s with ORIGINAL attention, ~250 s with SPLIT_EINSUM_V2, ~50-80 s to verify; the
# mixed-bit analysis ~24 min). Only the order of the parallel schedule depends on these: longest chains first.
DURATION_PER_WEIGHT_BYTE = {"convert": 1.0, "chunk": 2.0, "analyze": 20.0, "compress": 0.2, "verify": 1.0}
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


def run_steps(runner: _Runner, steps: Sequence[Step], jobs: int, budget: int,
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


def _chain_durations(runner: _Runner, steps: Sequence[Step], needs: dict[str, set[str]]) -> dict[str, float]:
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
    return BuildResult(plan=plan, variants=results, built=runner.built, cached=runner.cached)


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
    from publisher.compress.palettization import SCHEME as PALETTIZE

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
        if step.id in runner.failed:
            raise BuildError(runner.failed[step.id])
        results.append(AnalysisResult(step.inputs[0].removeprefix("fetch:"), step.id, runner.outputs[step.id].path,
                                      "built" if step.id in runner.built else "cached"))
    return results
