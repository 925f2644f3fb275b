"""Manifests -> Plan: the variants to publish and the build steps they need, shared where inputs are equal.

Nothing here runs anything. A step's id is a readable label (for display) and a digest of what it is: its kind,
its typed parameters (with the contents of the files they name, a recipe) and its inputs' ids. Two variants share
a step only when they would compute the same thing (one float16 conversion per source/attention/component feeds
both the float16 and the palettized repo; two recipes make two compress steps). A stored step's key adds the code
it runs and the libraries' versions (`step_tools`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from publisher.errors import PublisherError
from publisher.family import family_named
from publisher.manifest import (
    Attention,
    Component,
    DeploymentTarget,
    Layout,
    LoadedManifest,
    check_resolved,
)
from publisher.plan_variant import ExtraSourceRef, Variant
from publisher.util.codehash import code_digest, module_closure
from publisher.util.hashing import json_sha256, step_key
from publisher.util.versions import library_versions
from publisher.vocabulary import Format, Resolution

StepKind = Literal["fetch", "convert", "chunk", "analyze", "compress", "verify", "evaluate", "compile", "coreai",
                   "assemble", "zip"]
STEP_KINDS: tuple[StepKind, ...] = ("fetch", "convert", "chunk", "analyze", "compress", "verify", "evaluate", "compile",
                                    "coreai", "assemble", "zip")
__all__ = ["ExtraSourceRef", "Plan", "Step", "Variant", "build_plan", "select_variants"]
# GitHub Actions refuses a matrix of more than 256 jobs.
GITHUB_MATRIX_LIMIT = 256
# The project modules each stored kind's work starts from (engine/build.py's step table runs them); a step's key
# covers them and every project module they import, normalised (publisher.util.codehash). A compress or analyze
# step adds its scheme's module. Fetches are keyed by the commit and the files, not by code; a community source's
# prepare step (publisher.engine.community, not a plan step) by the code listed under "prepare".
STEP_CODE: dict[str, tuple[str, ...]] = {
    "convert": ("publisher.convert.coreml",),
    "chunk": ("publisher.convert.chunk",),
    "analyze": ("publisher.compress.sensitivity",),
    # a compress step may take another package's compressed weights instead of running its scheme (rebase)
    "compress": ("publisher.compress.scheme", "publisher.compress.rebase"),
    "prepare": ("publisher.convert.community",),
    "verify": ("publisher.verify.fidelity", "publisher.verify.contract"),
    "evaluate": ("publisher.evaluate",),
    "compile": ("publisher.compile",),
    "coreai": ("publisher.convert.coreai",),
    "zip": ("publisher.layout",),
}
# the length of the content digest in a step id
ID_DIGEST = 16


# One parameter type per step kind: what the step's output depends on besides its inputs (the store keys it by them).


@dataclass(frozen=True)
class FetchParams:
    repo: str
    revision: str
    weights: str = "auto"
    family: str = "sd"  # which files the family's components load
    # an extra source (role "vae" | "refiner"): one component, from the first of `folders` (repo folders, "" the
    # root) that it has, laid out under `into`, the folder the family reads it from
    role: str = ""
    folders: tuple[str, ...] = ()
    into: str = ""
    # the manifest's source as a community model: one checkpoint file, the diffusers repo that describes it,
    # LoRAs fused before conversion (repo, file, revision, scale); see publisher.engine.community
    file: str = ""
    config: tuple[str, str] = ("", "")
    loras: tuple[tuple[str, str, str, float], ...] = ()

    @property
    def community(self) -> bool:
        return bool(self.file or self.loras)


@dataclass(frozen=True)
class ConvertParams:
    component: str
    attention: str | None  # None: a component no attention implementation changes, shared by every attention
    resolution: Resolution  # an int (square) or "WxH"
    deployment_target: str
    family: str = "sd"
    license: str = "other"  # written into the package's metadata


@dataclass(frozen=True)
class ChunkParams(ConvertParams):
    chunk: str = ""  # the submodule: which of the component's chunks


@dataclass(frozen=True)
class AnalyzeParams:
    """A compression scheme's analysis of one component's source weights (inputs: the fetch)."""

    scheme: str
    component: str
    resolution: Resolution
    settings: dict[str, Any]
    family: str = "sd"


@dataclass(frozen=True)
class CompressParams:
    """inputs: the float16 package, then the analysis when the scheme asked for one, then (`rebase`) the same
    package's compress step at the default size."""

    scheme: str
    settings: dict[str, Any]  # the scheme's manifest settings, as JSON
    component: str
    deployment_target: str
    inputs: dict[str, Any] = field(default_factory=dict)  # the contents of the files the settings name (a recipe)
    # the compressed weights of a package with the same float16 weights (a resolution pack's default size, the
    # ControlledUnet's UNet) on this package's program (publisher.compress.rebase), compressed anew where they differ
    rebase: bool = False


@dataclass(frozen=True)
class VerifyParams:
    component: str
    submodule: str
    family: str = "sd"


@dataclass(frozen=True)
class EvaluateParams:
    """inputs: the `sources` fetches (the manifest's source, then its extra sources: the reference reads the same
    weights as the packages), the verified packages of `submodules` (what generating runs), then, for a compressed
    variant (`float16`), the float16 packages of the same submodules."""

    submodules: tuple[str, ...]
    float16: bool
    settings: dict[str, Any]  # publisher.gate.EvaluationSettings, as JSON
    family: str = "sd"
    sources: int = 1


@dataclass(frozen=True)
class CompileParams:
    submodule: str


@dataclass(frozen=True)
class CoreAIParams:
    """One component's Core AI asset (inputs: the fetches it reads), exported, compressed and checked."""

    component: str
    resolution: Resolution
    compression: str  # CoreAICompression.kind
    nbits: int
    family: str = "sd"
    license: str = "other"  # written into the asset's metadata
    author: str = ""  # the source repo's owner


@dataclass(frozen=True)
class AssembleParams:
    layouts: tuple[str, ...]


@dataclass(frozen=True)
class ZipParams:
    name: str


StepParams = (FetchParams | ConvertParams | ChunkParams | AnalyzeParams | CompressParams | VerifyParams
              | EvaluateParams | CompileParams | CoreAIParams | AssembleParams | ZipParams)
PARAMS_OF: dict[StepKind, type] = {"fetch": FetchParams, "convert": ConvertParams, "chunk": ChunkParams,
                                   "analyze": AnalyzeParams, "compress": CompressParams, "verify": VerifyParams,
                                   "evaluate": EvaluateParams, "compile": CompileParams, "coreai": CoreAIParams,
                                   "assemble": AssembleParams, "zip": ZipParams}


@dataclass
class Step:
    id: str
    kind: StepKind
    inputs: tuple[str, ...]
    params: StepParams
    variants: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if type(self.params) is not PARAMS_OF[self.kind]:
            raise TypeError(f"{self.kind} step {self.id}: params must be {PARAMS_OF[self.kind].__name__}")

    @property
    def label(self) -> str:
        """The readable part of the id (for display: the id's digest is what makes it unique)."""
        return self.id.rsplit("#", 1)[0]

    def params_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.params).items()}

    def code_modules(self) -> tuple[str, ...]:
        """The project modules this step's work starts from (the key covers what they import too)."""
        modules = STEP_CODE.get(self.kind, ())
        scheme = getattr(self.params, "scheme", None)
        if scheme is not None:
            from publisher.compress.scheme import scheme_named

            modules += (type(scheme_named(scheme)).__module__,)
        return modules

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "kind": self.kind, "inputs": list(self.inputs),
                "params": self.params_json(), "variants": self.variants}


def content_id(label: str, kind: str, params: StepParams, inputs: Sequence[str]) -> str:
    """A step's id: its label and a digest of its kind, typed parameters and inputs' ids (which are digests too)."""
    data = {"kind": kind, "params": {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in dataclasses.asdict(params).items()}, "inputs": list(inputs)}
    return f"{label}#{json_sha256(data)[:ID_DIGEST]}"


def step_tools(step: Step) -> dict[str, str]:
    """What a stored step's key holds besides its parameters and inputs: the libraries' versions and the digest of
    the project code it runs (empty for a fetch: keyed by its commit and files)."""
    if step.kind not in STEP_CODE:
        return {}
    from publisher.util import versions  # looked up when called (a test replaces it)

    libraries = {**library_versions(), **(versions.coreai_versions() if step.kind == "coreai" else {})}
    return {**libraries, "code": code_digest(step.code_modules())}


def stored_key(step: Step, input_keys: list[str], extra: dict[str, Any] | None = None) -> str:
    """A stored step's key: its kind, its parameters (with what the build's options add, `extra`), its inputs' keys
    and what it runs with (`step_tools`). The engine and `Plan.keys` both compute it here."""
    return step_key(step.kind, {**step.params_json(), **(extra or {})}, input_keys, step_tools(step))


def fetch_key(repo: str, commit: str, params: FetchParams) -> str:
    """A fetch's key: the commit and what decides which files are taken (the engine's, with the resolved commit;
    the plan's, with the revision as written)."""
    where: dict[str, Any] = {"role": params.role, "folders": list(params.folders), "into": params.into} \
        if params.role else {}
    if params.community:
        where |= {"file": params.file, "config": list(params.config), "loras": [list(lora) for lora in params.loras]}
    return step_key("fetch", {"repo": repo, "commit": commit, "weights": params.weights, **where}, [], {})


@dataclass
class Plan:
    namespace: str
    variants: list[Variant]
    steps: dict[str, Step]  # insertion order is a valid execution order

    def steps_of(self, kind: StepKind) -> list[Step]:
        return [step for step in self.steps.values() if step.kind == kind]

    def counts(self) -> dict[str, int]:
        return {kind: len(self.steps_of(kind)) for kind in STEP_KINDS}

    def keys(self, extra: Callable[[Step], dict[str, Any]] | None = None) -> dict[str, str]:
        """Every step's store key as the plan knows it: fetches keyed by the revision as written (the engine uses
        the commit it resolves to, so the two agree where a manifest pins a commit). `extra`: parameters the
        engine adds at run time (its options)."""
        keys: dict[str, str] = {}
        for step in self.steps.values():
            if isinstance(step.params, FetchParams):
                keys[step.id] = fetch_key(step.params.repo, step.params.revision, step.params)
            else:
                keys[step.id] = stored_key(step, [keys[i] for i in step.inputs], extra(step) if extra else None)
        return keys

    def to_json(self) -> dict[str, Any]:
        keys = self.keys()
        steps = []
        for step in self.steps.values():
            entry = step.to_json()
            entry["key"] = keys[step.id]
            if step.kind in STEP_CODE:
                entry["code"] = {"modules": module_closure(step.code_modules()),
                                 "sha256": code_digest(step.code_modules())}
                entry["tools"] = library_versions()
            steps.append(entry)
        return {
            "namespace": self.namespace,
            "variants": [v.to_json() for v in self.variants],
            "steps": steps,
            "counts": {"variants": len(self.variants), **self.counts()},
        }

    def github_matrix(self, only: Sequence[str] | None = None) -> dict[str, Any]:
        """The `strategy.matrix` the workflow consumes: one job per group of variants that share a conversion
        (the float16 ORIGINAL conversion feeds the float16 and the palettized repo), so each conversion runs once
        and a failure reruns only its group. `variants` is space-separated, for `--variant` per id."""
        chosen = [v for v in self.variants if only is None or v.id in only]
        groups = self.shared_groups(chosen)
        if len(groups) > GITHUB_MATRIX_LIMIT:
            raise ValueError(f"{len(groups)} jobs exceed GitHub's matrix limit of {GITHUB_MATRIX_LIMIT}")
        return {"include": [
            {"job": group[0].id if len(group) == 1 else
             f"{group[0].manifest_name}/{'+'.join(sorted({v.folder for v in group}))}",
             "variants": " ".join(v.id for v in group), "manifest": group[0].manifest_path,
             "repos": " ".join(sorted({v.repo_id for v in group})),
             "compile": any(Layout.COMPILED in v.layouts for v in group),
             # a group is one manifest's variants: its runners; a Core AI check's only where it has a bundle
             "runner": group[0].convert_runner, "compile_runner": group[0].compile_runner,
             "coreai_runner": group[0].coreai_runner if any(v.coreai for v in group) else ""}
            for group in groups
        ]}

    def shared_groups(self, variants: Sequence[Variant]) -> list[list[Variant]]:
        """`variants` partitioned so that two variants needing the same conversion share a group (the fetch, which
        every variant of a source shares, does not join them: it is cached per job)."""
        parent = {v.id: v.id for v in variants}

        def root(item: str) -> str:
            while parent[item] != item:
                parent[item] = parent[parent[item]]
                item = parent[item]
            return item

        for step in self.steps.values():
            # conversions every attention shares (the text encoder's) are cheap and would join all of a model's
            # variants into one job: each job that needs one converts it, the heavy ones run once
            members = []
            if isinstance(step.params, ConvertParams) and step.params.attention is not None:
                members = [v for v in step.variants if v in parent]
            elif isinstance(step.params, CompressParams) and step.params.rebase:
                # a resolution pack's compressed package is made from the default size's: one job for both
                members = [v for v in (*step.variants, *self.steps[step.inputs[-1]].variants) if v in parent]
            for other in members[1:]:
                parent[root(other)] = root(members[0])
        grouped: dict[str, list[Variant]] = {}
        for v in variants:
            grouped.setdefault(root(v.id), []).append(v)
        return list(grouped.values())


class _Builder:
    def __init__(self) -> None:
        self.steps: dict[str, Step] = {}

    def add(self, label: str, kind: StepKind, inputs: Sequence[str], params: StepParams, variant: str) -> str:
        """The step with this content (a new one, or the one another variant added), with `variant` among its
        readers; returns its id."""
        step_id = content_id(label, kind, params, inputs)
        step = self.steps.get(step_id)
        if step is None:
            step = self.steps[step_id] = Step(step_id, kind, tuple(inputs), params)
        if variant not in step.variants:
            step.variants.append(variant)
        return step_id

    def label(self, step_id: str) -> str:
        return self.steps[step_id].label


def expand_variants(loaded: Sequence[LoadedManifest], namespace: str) -> list[Variant]:
    check_resolved(loaded, namespace)
    variants: list[Variant] = []
    for item in loaded:
        manifest = item.manifest
        for index, target, attention, size in ((i, t, a, z) for i, t in enumerate(manifest.publish)
                                               for a in t.attention for z in manifest.sizes):
            if Format.COREML not in target.formats:
                continue
            components = tuple(_with_controlnet(manifest, target, attention, size))
            variants.append(Variant(
                manifest_name=manifest.name,
                manifest_path=str(item.path),
                repo_id=target.repo_id(namespace),
                attention=attention,
                precision=target.precision,
                components=components,
                compute_unit=target.compute_unit(attention),
                deployment_target=target.deployment_target,
                chunk_unet=target.chunks_unet(attention),
                layouts=tuple(target.layouts),
                resolution=size,
                default_size=None if size == manifest.default_size else manifest.default_size,
                precision_inputs=item.inputs_of(index),
                **_extra_sources(manifest, components),
                **_source_fields(manifest),
                evaluate=target.evaluate is not False,
                evaluate_settings=() if isinstance(target.evaluate, bool) else tuple(
                    (k, val) for k, val in target.evaluate.model_dump().items()
                    if val != type(target.evaluate)().model_dump()[k]),
            ))
        variants += [_coreai_variant(item, index, target, namespace) for index, target in enumerate(manifest.publish)
                     if Format.COREAI in target.formats]
    return variants


def _coreai_variant(item: LoadedManifest, index: int, target: Any, namespace: str) -> Variant:
    """A repo's Core AI bundle: its Core AI components at the default size (the rules checked it can be made)."""
    from publisher.coreai_bundle import ASSETS, compression_for

    manifest = item.manifest
    compression = compression_for(target.precision, target.coreai_compression)
    assert not isinstance(compression, str), compression  # manifest_rules refused it
    components = tuple(c for c in manifest.components_for(target) if c in ASSETS)
    return Variant(
        manifest_name=manifest.name, manifest_path=str(item.path), repo_id=target.repo_id(namespace),
        attention=Attention.ORIGINAL, precision=target.precision, components=components,
        compute_unit=target.compute_unit(Attention.ORIGINAL), deployment_target=target.deployment_target,
        chunk_unet=False, layouts=(), resolution=manifest.default_size, precision_inputs=item.inputs_of(index),
        **_extra_sources(manifest, components), **_source_fields(manifest),
        evaluate=False, format=Format.COREAI, coreai_compression=compression)


def _source_fields(manifest: Any) -> dict[str, Any]:
    """What every variant of a manifest takes from it: the source (a community checkpoint, its LoRAs), the
    license and family, the runners."""
    source = manifest.source
    return {"source_repo": source.repo, "source_revision": source.revision, "source_weights": source.weights,
            "license": manifest.license, "family": manifest.family, "source_file": source.file or "",
            "source_config": (source.config.repo, source.config.revision) if source.config else ("", ""),
            "source_loras": tuple((lora.repo, lora.file, lora.revision, float(lora.scale)) for lora in source.loras),
            "convert_runner": manifest.runners.convert, "compile_runner": manifest.runners.compile,
            "coreai_runner": manifest.runners.coreai_check or ""}


def _with_controlnet(manifest: Any, target: Any, attention: Attention, size: Any) -> list[Component]:
    """The target's components at a size, with the ControlledUnet and the manifest's ControlNets where the target
    asks for them for this attention."""
    components = manifest.components_for(target, size)
    family = family_named(manifest.family)
    if target.controls(attention) and family.has(Component.CONTROL_UNET):
        components = family.ordered([*components, Component.CONTROL_UNET, *manifest.controlnet_components])
    return list(components)


def _extra_sources(manifest: Any, components: Sequence[Component]) -> dict[str, Any]:
    roles = tuple((c, role) for c in components if (role := manifest.source_role(c)))
    refs = []
    for role in sorted({role for _, role in roles}):
        extra = manifest.source_of(role)
        refs.append(ExtraSourceRef(role, extra.repo, extra.revision, extra.weights))
    return {"extra_sources": tuple(refs), "roles": roles}


def _extra_fetch(v: Variant, ref: ExtraSourceRef) -> FetchParams:
    """What to fetch from an extra source: a custom VAE from the repo's `vae/` or its root, into `vae/`; a
    family's component (the refiner) from the folder its spec names, into the component's folder."""
    folders: tuple[str, ...]
    if ref.role == "vae":
        folders, into = ("vae", ""), "vae"
    elif v.model_family.is_controlnet(ref.role):  # a ControlNet repo holds one model: at its root, or `controlnet/`
        spec = v.model_family.component(Component(ref.role))
        folders, into = ("", spec.source_folder), spec.folder
    else:
        spec = next(s for s in v.model_family.components if s.source_role == ref.role)
        folders, into = (spec.source_folder,), spec.folder
    return FetchParams(ref.repo, ref.revision, ref.weights, v.family, ref.role, folders, into)


def _origin(v: Variant, component: Component | None = None) -> str:
    """The sources a step reads, as a label: the manifest's source (the weight copy is part of it: the same repo
    read as fp32 is another source), plus the extra source a component comes from."""
    source = f"{v.source_repo}@{v.source_revision}" + ("" if v.source_weights == "auto" else f"#{v.source_weights}")
    if v.source_file:
        source += f":{v.source_file}"
    if v.source_loras:  # the LoRAs and their scales make another source (the label shows their digest)
        source += f"+{len(v.source_loras)}lora#{json_sha256([list(lora) for lora in v.source_loras])[:8]}"
    role = v.role_of(component) if component is not None else ""
    return source + (f"+{v.extra_source(role).label}" if role else "")


def _conversion_target(variant: Variant, float16_targets: dict[tuple[Any, ...], list[DeploymentTarget]],
                       base: tuple[Any, ...]) -> DeploymentTarget:
    """A compressed variant reuses the float16 conversion of the same source/attention/component when one is
    planned at a deployment target it can run on; otherwise it converts at its own target."""
    if _compressing(variant) and not variant.precision.scheme.own_conversion(variant.precision):
        usable = [t for t in float16_targets.get(base, []) if t.level <= variant.deployment_target.level]
        if usable:
            return min(usable, key=lambda t: (t.level, t.value))
    return variant.deployment_target


def _compressing(variant: Variant) -> bool:
    return any(variant.compresses(c) for c in variant.components)


def build_plan(loaded: Sequence[LoadedManifest], namespace: str) -> Plan:
    variants = expand_variants(loaded, namespace)
    float16_targets: dict[tuple[Any, ...], list[DeploymentTarget]] = {}
    for v in variants:
        if not _compressing(v):
            for component in v.components:
                attention = v.attention if v.uses_attention(component) else None
                key = (_origin(v, component), attention, component, v.size_of_component(component))
                float16_targets.setdefault(key, []).append(v.deployment_target)

    builder = _Builder()
    compressed_at_default: dict[tuple[str, Attention, str], str] = {}  # (repo, attention, submodule) -> step id
    for v in variants:
        scheme = v.precision.scheme
        settings = v.precision.model_dump(mode="json", exclude_none=True)
        source = _origin(v)
        fetch = builder.add(f"fetch:{source}", "fetch", [], FetchParams(
            v.source_repo, v.source_revision, v.source_weights, v.family, file=v.source_file,
            config=v.source_config, loras=v.source_loras), v.id)
        extra_fetches = {ref.role: builder.add(f"fetch:{ref.label}:{ref.role}", "fetch", [], _extra_fetch(v, ref),
                                               v.id) for ref in v.extra_sources}
        if v.coreai:
            _coreai_steps(builder, v, fetch, extra_fetches)
            continue
        packages: list[tuple[str, str]] = []  # (submodule, step id of the final package)
        compressed_here: dict[str, str] = {}  # submodule -> its compress step, in this variant
        packages_only: set[str] = set()  # submodules the compiled Resources leave out
        floats: dict[str, str] = {}  # submodule -> its float16 package (the verified one where not compressed)
        for component in v.components:
            attention = v.attention if v.uses_attention(component) else None  # None: shared by every attention
            role = v.role_of(component)
            # a component from an extra source reads it and the manifest's source (where the dimensions are)
            origin = _origin(v, component)
            fetches = [fetch] + ([extra_fetches[role]] if role else [])
            size = v.size_of_component(component)  # a pack's own for the UNet and VAE, the default's for the rest
            base = (origin, attention, component, size)
            target = _conversion_target(v, float16_targets, base)
            convert = ConvertParams(component.value, attention.value if attention else None, size,
                                    target.value, v.family, v.license)
            whole = (component.value, builder.add(
                f"convert:{origin}:{attention.value if attention else 'any'}:{component.value}:{size}:"
                f"{target.value}", "convert", fetches, convert, v.id))
            chunks = v.model_family.submodules(component, chunked=True) if v.chunk_unet else (component.value,)
            if chunks != (component.value,):
                # the chunks are converted from the source as two modules, not cut from a converted UNet. The
                # Swift pipeline loads the chunks; Apple's Python pipeline opens only a whole `unet` package, so the
                # packages folder keeps it too, and the compiled Resources (what iOS downloads) leave it out
                pieces = [whole] + [(name, builder.add(
                    f"chunk:{origin}:{v.attention.value}:{name}:{size}:{target.value}", "chunk", fetches,
                    ChunkParams(**dataclasses.asdict(convert), chunk=name), v.id))
                    for name in chunks]
                packages_only.add(component.value)
            else:
                pieces = [whole]
            compressed = v.compresses(component)
            analysis: list[str] = []
            request = scheme.analysis(v.precision, component.value, v.precision_inputs) if compressed else None
            if request is not None:  # of the source's weights: shared by every attention and target
                analyze = AnalyzeParams(scheme.name, request.component, v.base_size, request.params, v.family)
                analysis = [builder.add(f"analyze:{source}:{request.component}:{v.base_size}:{scheme.name}:"
                                        f"{json_sha256(request.params)[:12]}", "analyze", [fetch], analyze, v.id)]
            for submodule, package in pieces:
                float_package = package
                if compressed:
                    # the same weights compressed already: the default size's package (a resolution pack), or the
                    # component whose weights this one has (the ControlledUnet's are the UNet's)
                    twin = v.model_family.component(component).same_weights_as  # and its chunks, the twin's
                    reuse = compressed_at_default.get((v.repo_id, v.attention, submodule)) if size != v.base_size \
                        else compressed_here.get(submodule.replace(component.value, twin, 1)) if twin else None
                    package = builder.add(
                        f"{scheme.name}:{builder.label(package)}:{v.precision.label}:{v.deployment_target.value}",
                        "compress", [package, *analysis, *([reuse] if reuse else [])],
                        CompressParams(scheme.name, settings, component.value, v.deployment_target.value,
                                       dict(v.precision_inputs), reuse is not None), v.id)
                    compressed_here[submodule] = package
                    if size == v.base_size:
                        compressed_at_default.setdefault((v.repo_id, v.attention, submodule), package)
                verify = builder.add(f"verify:{builder.label(package)}", "verify", [package],
                                     VerifyParams(component.value, submodule, v.family), v.id)
                packages.append((submodule, verify))
                floats[submodule] = float_package if compressed else verify
        evaluation = _evaluate_step(builder, v, fetch, extra_fetches, dict(packages), floats, packages_only)
        compiled: list[str] = []
        if Layout.COMPILED in v.layouts:
            compiled = [builder.add(f"compile:{builder.label(package)}", "compile", [package], CompileParams(submodule),
                                    v.id)
                        for submodule, package in packages if submodule not in packages_only]
        assemble = builder.add(f"assemble:{v.id}", "assemble", [fetch] + [p for _, p in packages] + evaluation + compiled,
                               AssembleParams(tuple(layout.value for layout in v.layouts)), v.id)
        if Layout.ZIP in v.layouts:
            builder.add(f"zip:{v.id}", "zip", [assemble], ZipParams(v.zip_name), v.id)
    return Plan(namespace=namespace, variants=variants, steps=builder.steps)


def _coreai_steps(builder: _Builder, v: Variant, fetch: str, extra_fetches: dict[str, str]) -> None:
    """A Core AI bundle: one asset per component (shared by every repo that asks for the same one), then the
    bundle's folder."""
    from publisher.coreai_bundle import COMPRESSIBLE, CoreAICompression

    assets = []
    for component in v.components:
        role = v.role_of(component)
        # the VAE is never compressed: one asset for every bundle of the source
        compression = v.coreai_compression if component in COMPRESSIBLE else CoreAICompression()
        params = CoreAIParams(component.value, v.resolution, compression.kind, compression.nbits, v.family, v.license,
                              v.source_repo.split("/", 1)[0])
        assets.append(builder.add(f"coreai:{_origin(v, component)}:{component.value}:{v.resolution}:{compression.label}",
                                  "coreai", [fetch] + ([extra_fetches[role]] if role else []), params, v.id))
    builder.add(f"assemble:{v.id}", "assemble", [fetch, *assets], AssembleParams(("coreai",)), v.id)


def _evaluate_step(builder: _Builder, v: Variant, fetch: str, extra_fetches: dict[str, str],
                   packages: dict[str, str], floats: dict[str, str], packages_only: set[str]) -> list[str]:
    """The variant's end-to-end check, where the manifest wants it and the variant has what generating runs (the
    text encoder(s), the UNet, whole or as the chunks the Swift pipeline takes, and the VAE decoder); [] otherwise."""
    if not v.evaluate or v.family not in ("sd", "sdxl"):
        return []
    unet = [name for name in ("unet_chunk1", "unet_chunk2") if name in packages] if "unet" in packages_only \
        else ["unet"]
    encoders = ("text_encoder", "text_encoder_2") if v.family == "sdxl" else ("text_encoder",)
    submodules = (*encoders, *unet, "vae_decoder")  # SDXL's refiner is left out: the reference has none
    if any(name not in packages for name in submodules):
        return []
    compressed = any(floats[name] != packages[name] for name in submodules)
    # the reference reads the sources of what it generates with (a custom VAE), not the others (a ControlNet)
    roles = sorted({v.role_of(v.model_family.component_of(name)) for name in submodules} - {""})
    fetches = [fetch, *(extra_fetches[role] for role in roles)]
    from publisher.gate import EvaluationSettings

    settings = EvaluationSettings(steps=int(dict(v.evaluate_settings).get("steps", 10))).to_json()
    inputs = [*fetches, *(packages[name] for name in submodules), *((floats[name] for name in submodules)
                                                                     if compressed else ())]
    return [builder.add(f"evaluate:{v.id}", "evaluate", inputs, EvaluateParams(submodules, compressed, settings,
                                                                                v.family, len(fetches)), v.id)]


def select_variants(plan: Plan, patterns: Sequence[str] | None) -> list[Variant]:
    if not patterns:
        return list(plan.variants)
    chosen = [v for v in plan.variants if any(v.id == p or fnmatch.fnmatchcase(v.id, p) for p in patterns)]
    if not chosen:
        raise PublisherError(f"no variant matches {', '.join(patterns)} (see `publisher plan`)")
    return chosen
