"""The state a build shares among its parts: the plan and options, the store, what each step produced or why it
failed, and the questions every part asks of a step (its variant, the sources it reads, where to run it)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from publisher.errors import PublisherError
from publisher.plan import ConvertParams, Plan, Step, Variant, VerifyParams
from publisher.store import BuildStore, StoredOutput, tool_versions
from publisher.vocabulary import Attention, Component

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
    # the end-to-end check (publisher.evaluate): "auto" where it is cheap (Core ML on macOS; on Linux a source whose
    # UNet's weights load in under EVALUATE_AUTO_BYTES, float32), "on" always, "off" never (the library's default: a caller asks)
    evaluate: str = "off"


EVALUATE_AUTO_BYTES = 256 * 2**20


@dataclass
class VariantResult:
    variant: Variant
    status: str = "pending"  # built | cached | failed
    files: int = 0
    size: int = 0
    seconds: float = 0.0
    path: Path | None = None
    error: str | None = None
    traceback: str | None = None  # of the step that failed (shown with --debug)


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
class Fetched:
    key: str
    path: Path
    commit: str
    repo: str
    revision: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> size, sha256 of what was downloaded
    # a community source (publisher.engine.community): the other repos it was made from by role ("config",
    # "lora01", ...), the key of each component folder by the content the conversion reads (so a LoRA that leaves
    # the text encoder alone leaves its key alone), the float32 bytes of the weights loaded (memory estimates),
    # what the checkpoint was found to be, each LoRA's scale
    parts: dict[str, Fetched] = field(default_factory=dict)
    folder_keys: dict[str, str] = field(default_factory=dict)
    loaded_bytes: dict[str, int] = field(default_factory=dict)
    architecture: str | None = None
    scale: float | None = None


class BuildState:
    """What the scheduler, the step table, reference sharing and assembly read and write."""

    def __init__(self, plan: Plan, options: BuildOptions, report: Callable[[str], None]) -> None:
        self.plan = plan
        self.options = options
        self.store = BuildStore(options.store, verify=options.verify_store)
        self.versions = tool_versions()
        self.keys: dict[str, str] = {}
        self.outputs: dict[str, StoredOutput] = {}
        self.fetched: dict[str, Fetched] = {}
        self.failed: dict[str, str] = {}  # step id -> one line
        self.tracebacks: dict[str, str] = {}  # step id -> the failure's traceback (the child process's too)
        self.built: list[str] = []
        self.cached: list[str] = []
        self.report = report
        self._local = threading.local()  # per worker thread of run_steps: the running step's torch threads

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A heavy step's work: in a process of its own (isolate), with the torch threads the step was given;
        else in this process."""
        if not self.options.isolate:
            return function(*args, **kwargs)
        from publisher.convert.coreml import run_isolated

        return run_isolated(function, *args, threads=getattr(self._local, "threads", None), **kwargs)

    def input_key(self, input_id: str, step: Step) -> str:
        """The key a step's input contributes to its key: a community source's per-folder key for the step's
        component (what it reads), any other input's own key."""
        fetched = self.fetched.get(input_id)
        component = getattr(step.params, "component", None)
        if fetched is not None and fetched.folder_keys and component is not None:
            folder = self.variant_of(step).model_family.component(Component(component)).folder
            return fetched.folder_keys.get(folder, fetched.key)
        return self.keys[input_id]

    def variant_of(self, step: Step) -> Variant:
        return next(v for v in self.plan.variants if v.id in step.variants)

    def fetches_of(self, step: Step) -> list[str]:
        """The fetch steps a step's package comes from (through compress and verify steps to the conversion)."""
        while not any(self.plan.steps[i].kind == "fetch" for i in step.inputs):
            step = self.plan.steps[step.inputs[0]]
        return [i for i in step.inputs if self.plan.steps[i].kind == "fetch"]

    def source(self, step: Step) -> Fetched:
        """The source a step's component is read from (its extra source, if it has one)."""
        return self.fetched[self.fetches_of(step)[-1]]

    def source_path(self, step: Step) -> Path:
        """The folder a step loads from: the fetched source, or, for a component from an extra source, one
        folder with both (the manifest's source holds the configs the dimensions are read from)."""
        from publisher.engine.source import compose_sources

        fetches = self.fetches_of(step)
        if len(fetches) == 1:
            return self.fetched[fetches[0]].path
        return compose_sources([self.fetched[f].path for f in fetches], self.options.store / "hub-cache")

    def metadata(self, step: Step) -> Any:
        from publisher.convert.coreml import PackageMetadata

        source = self.source(step)
        assert isinstance(step.params, ConvertParams)
        attention = step.params.attention
        return PackageMetadata(source=f"{source.repo}@{source.commit}", license=step.params.license,
                               attention=Attention(attention) if attention else None)

    def is_chunk(self, step: Step) -> bool:
        return isinstance(step.params, VerifyParams) and \
            self.variant_of(step).model_family.chunk_index(step.params.submodule) is not None

    def weight_bytes(self, step: Step) -> int:
        """The float32 size of the step's component's weights in its fetched source (0 before the fetch)."""
        component = getattr(step.params, "component", None)
        if not component:
            return 0
        folder = self.variant_of(step).model_family.component(Component(component)).folder
        return sum(fetched_weight_bytes(self.fetched[f], folder) for f in self.fetches_of(step) if f in self.fetched)

    def variant_steps(self, variant: Variant) -> list[Step]:
        return [s for s in self.plan.steps.values() if variant.id in s.variants]


def fetched_weight_bytes(fetched: Fetched, folder: str) -> int:
    """The float32 size of a fetched source's weights under `folder/`: a community source's as prepared (its
    folders are not the files it fetched), else its weight files' (an fp16 copy loads at twice its size)."""
    loaded = fetched.loaded_bytes or {name: int(entry.get("size", 0)) * (2 if ".fp16." in name else 1)
                                      for name, entry in fetched.files.items()}
    return sum(size for name, size in loaded.items()
               if name.startswith(f"{folder}/") and name.endswith((".safetensors", ".bin")))
