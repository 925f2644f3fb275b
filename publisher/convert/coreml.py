"""Trace a component and convert it to a float16 ML Program `.mlpackage` with the contract's names.

`convert_component` is pure with respect to its arguments (source folder in, package folder out); `convert_isolated`
runs it in a process of its own so that one model's memory is returned to the system before the next starts.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from publisher.contract import FLOAT16, FLOAT32, ModelSpec, TensorSpec
from publisher.deployment import DeploymentTarget
from publisher.mlpackage import import_coremltools, save_package
from publisher.util.memory import return_large_blocks
from publisher.vocabulary import Attention, Component, Resolution

T = TypeVar("T")


@dataclass(frozen=True)
class PackageMetadata:
    """What goes into the package's description fields."""

    source: str  # repo@revision
    license: str
    attention: Attention | None  # None: the component is the same for every attention implementation
    author: str = "coreml-publisher"
    version: str = ""


@dataclass(frozen=True)
class ConvertResult:
    path: str
    inputs: list[str]
    outputs: list[str]


def deployment_target(ct: Any, target: DeploymentTarget) -> Any:
    return getattr(ct.target, target.value)


def describe(model: Any, spec_inputs: Sequence[TensorSpec], spec_outputs: Sequence[TensorSpec], description: str,
             metadata: PackageMetadata) -> None:
    how = f" ({metadata.attention.value} attention)" if metadata.attention else ""
    model.short_description = f"{description}{how} converted from {metadata.source}"
    model.author = metadata.author
    model.license = metadata.license
    model.version = metadata.version or metadata.source
    for tensor in spec_inputs:
        model.input_description[tensor.name] = f"{tensor.description}, shape {list(tensor.shape)}"
    for tensor in spec_outputs:
        model.output_description[tensor.name] = f"{tensor.description}, shape {list(tensor.shape)}"
    model.user_defined_metadata.update({
        "com.github.coreml-publisher.source": metadata.source,
        **({"com.github.coreml-publisher.attention": metadata.attention.value} if metadata.attention else {}),
    })


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def trace(module: Any, inputs: tuple[Any, ...]) -> Any:
    import torch

    with warnings.catch_warnings(), torch.no_grad():  # no autograd graph: activations are freed as they go
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, inputs, check_trace=False, strict=False)


@contextlib.contextmanager
def _no_constant_folding() -> Iterator[None]:
    """While creating a cast of a constant, skip its value inference (the folding happens later, in float16)."""
    from coremltools.converters.mil.mil.ops.defs.iOS15.elementwise_unary import cast as cast15
    from coremltools.converters.mil.mil.ops.defs.iOS17.elementwise_unary import cast as cast17

    def refuse(self: Any) -> Any:
        raise NotImplementedError

    originals = {op_class: op_class.value_inference for op_class in (cast15, cast17)}
    for op_class in originals:
        op_class.value_inference = refuse
    try:
        yield
    finally:
        for op_class, method in originals.items():
            op_class.value_inference = method


@contextlib.contextmanager
def _validated_once_per_pipeline() -> Iterator[None]:
    """Run coremltools' pass pipelines with one validation of the program at the end of each, not after every
    pass. The checks only read the program (op inputs against their consumers, block outputs, scope info), and
    coremltools runs them ~110 times per conversion: 21 s of the 106 s a full-size SPLIT_EINSUM_V2 UNet takes
    (measured per pass), as long as the passes themselves. The scope check, which coremltools makes after each
    dead-code elimination, is made at the end where the pipeline ends with one (the default pipeline does)."""
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    def apply_pipeline(prog: Any, pass_pipeline: Any) -> None:
        if pass_pipeline is None:
            raise ValueError("no pass pipeline given")
        pass_pipeline.validate()
        names = list(pass_pipeline.passes)
        for name in names:
            graph_pass = PASS_REGISTRY[name]
            graph_pass.set_options(pass_pipeline.get_options(name))
            graph_pass(prog)
        prog.validate(check_essential_scope=bool(names) and names[-1] == "common::dead_code_elimination")

    original = PassPipelineManager.__dict__["apply_pipeline"]
    PassPipelineManager.apply_pipeline = staticmethod(apply_pipeline)
    try:
        yield
    finally:
        PassPipelineManager.apply_pipeline = original


COLLECT_EVERY_BYTES = 256 * 2**20


def to_float16(value: Any) -> Any:
    """float32 -> float16 with IEEE round-to-nearest-even, as numpy's `astype` (bit for bit, overflow to inf and
    subnormals included; tested), through torch's vectorised conversion: 3.4 GB of UNet weights in ~2 s instead
    of ~30 s."""
    import torch

    return torch.from_numpy(value).to(torch.float16).numpy()


def _weights_to_float16(prog: Any, min_elements: int = 256) -> int:
    """Replace large float32 constants by float16 ones. Each float32 array is released as soon as its
    replacement exists, so the program never holds both copies of all weights at once."""
    import numpy as np

    ct = import_coremltools()
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo

    replaced = 0
    released = 0  # float32 bytes dropped since the last collection
    function = prog.functions["main"]
    # a list of the ops to replace, each slot cleared once done: a removed op must not stay referenced here,
    # or its float32 array would live on to the end of the loop
    pending: list[Any] = [op for op in function.operations if op.op_type == "const"]
    with function:
        for index in range(len(pending)):
            op = pending[index]
            pending[index] = None
            value = op.outputs[0].val
            if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.size < min_elements:
                continue
            scopes = [ScopeInfo(source=source, data=list(data)) for source, data in op.scopes.items()]
            with contextlib.ExitStack() as stack:
                if scopes:  # keep the torch module scopes: later passes require them on every op
                    stack.enter_context(mb.scope(*scopes))
                half = mb.const(val=to_float16(value), before_op=op, name=op.name + "_fp16")
                with _no_constant_folding():  # a folded cast would materialise the float32 copy again
                    back = mb.cast(x=half, dtype="fp32", before_op=op, name=op.name + "_fp32")
            # anchored at the replaced op itself: coremltools then rewires that op's consumers only, instead of
            # scanning every later op of the program for each weight (most of this function's time otherwise)
            function.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=back,
                                                  no_check_var_types=True)
            function.remove_ops([op])
            released += value.nbytes
            del value, op, half, back
            replaced += 1
            if released > COLLECT_EVERY_BYTES:
                # a removed op and its output variable refer to each other: only the cycle collector frees the
                # float32 array, and without this it would run too rarely to keep the peak down (SDXL's UNet:
                # +5 GB)
                gc.collect()
                released = 0
    del ct
    return replaced


def _split_pipeline(ct: Any) -> tuple[Any, Any]:
    """coremltools' default pipeline cut where float16 begins. The first half runs on the float32 program as
    it would in a plain conversion; the second half starts with the float16 cast, immediately followed by cast
    merging, so that float16 weights (cast back to float32 by us) meet their float16 casts before any constant
    folding could expand them to float32 again."""
    names = list(ct.PassPipeline.DEFAULT.passes)
    cut = names.index("common::add_fp16_cast")
    first = ct.PassPipeline(pass_names=names[:cut], pipeline_name="publisher_float32_part")
    second_names = [names[cut], "common::cast_optimization", "common::dead_code_elimination", *names[cut + 1:]]
    second = ct.PassPipeline(pass_names=second_names, pipeline_name="publisher_float16_part")
    return first, second


def to_mlprogram(traced: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 target: DeploymentTarget, progress: Progress = _quiet, precision: str = FLOAT16) -> Any:
    """Convert with coremltools' own passes, in an order that lets the float32 weights go early.

    The traced module's last reference goes as soon as the frontend has produced the MIL program; the float32
    half of the pipeline runs; then each float32 weight is replaced by its float16 value one at a time (each
    float32 array is freed as its replacement appears); then the float16 half and the ML Program backend run.
    The weights are the same float16 values as in a plain conversion (checked by the tests), at a lower peak.
    A float32 model (`precision`, the SDXL VAE) is one plain conversion: there is nothing to cast.
    """
    import numpy as np

    ct = import_coremltools()
    # the contract's dtypes: float16 inputs (Apple's pipeline refuses others) except the token ids and a
    # chunk's float32 intermediates; float32 outputs, which the apps and the next chunk read
    input_types = [ct.TensorType(name=t.name, shape=t.shape, dtype=np.dtype(t.dtype).type) for t in inputs]
    output_types = [ct.TensorType(name=t.name, dtype=np.dtype(t.dtype).type) for t in outputs]
    if precision == FLOAT32:
        with _validated_once_per_pipeline():
            return ct.convert(traced, inputs=input_types, outputs=output_types, convert_to="mlprogram",
                              compute_precision=ct.precision.FLOAT32, skip_model_load=True,
                              minimum_deployment_target=deployment_target(ct, target))
    first, second = _split_pipeline(ct)
    holder = [traced]
    del traced
    with _validated_once_per_pipeline():
        prog = ct.convert(
            holder.pop(),
            inputs=input_types,
            outputs=output_types,
            convert_to="milinternal",
            compute_precision=ct.precision.FLOAT32,
            minimum_deployment_target=deployment_target(ct, target),
            pass_pipeline=first,
        )
    gc.collect()
    progress("frontend + float32 passes")
    _weights_to_float16(prog)
    gc.collect()
    progress("weights float16")
    with _validated_once_per_pipeline():
        return ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                          pass_pipeline=second, minimum_deployment_target=deployment_target(ct, target),
                          skip_model_load=True)


def convert_module(module_holder: list[Any], spec: ModelSpec, example: tuple[Any, ...], target: DeploymentTarget,
                   metadata: PackageMetadata, output: Path, spec_inputs: Sequence[TensorSpec] | None = None,
                   spec_outputs: Sequence[TensorSpec] | None = None, progress: Progress = _quiet) -> ConvertResult:
    """Trace and convert the module in `module_holder` (a one-item list this function empties, so that the last
    reference to the PyTorch module is dropped before conversion)."""
    inputs = list(spec_inputs or spec.inputs)
    outputs = list(spec_outputs or spec.outputs)
    return_large_blocks()
    traced = [trace(module_holder.pop(), example)]
    gc.collect()
    progress("trace")
    model = to_mlprogram(traced.pop(), inputs, outputs, target, progress, spec.precision)
    gc.collect()
    progress("convert")
    describe(model, inputs, outputs, spec.description, metadata)
    save_package(model, output)
    progress("save")
    return ConvertResult(path=str(output), inputs=[t.name for t in inputs], outputs=[t.name for t in outputs])


def convert_component(source: Path, component: Component, attention: Attention, resolution: Resolution,
                      target: DeploymentTarget, output: Path, metadata: PackageMetadata,
                      progress: Progress = _quiet, family: str = "sd") -> ConvertResult:
    """Convert one component of a diffusers checkpoint folder to `output` (an .mlpackage folder)."""
    from publisher.convert.components import example_inputs, load_component

    loaded = [load_component(Path(source), component, attention, resolution, label=metadata.source, family=family)]
    spec = loaded[0].spec
    example = example_inputs(spec)
    holder = [loaded.pop().module]
    progress("load")
    return convert_module(holder, spec, example, target, metadata, Path(output), progress=progress)


# Where the platform allows it, isolated steps start as forks of one server process that has imported torch,
# coremltools, diffusers and transformers (publisher.convert.preload): 0.27 s per step (measured) instead of a
# fresh interpreter's 6-9 s of imports, ~28 times in a full build. Nothing has run a model in that server, so no thread
# pool is inherited. Elsewhere (macOS: its system frameworks are not fork-safe) each step is a fresh interpreter.
PRELOAD = ["publisher.convert.preload"]


def _child_init(environ: dict[str, str], cwd: str, threads: int | None) -> None:
    # a fork of the server has the server's environment and working folder: take the caller's, as of this call
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _context() -> multiprocessing.context.BaseContext:
    if sys.platform == "linux" and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _pool(threads: int | None = None) -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(max_workers=1, mp_context=_context(), initializer=_child_init,
                             initargs=(dict(os.environ), os.getcwd(), threads)) as pool:
        yield pool


STEP_FOLDER_PREFIX = "publisher-step-"


def _in_own_temp_folder(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `function` with the temp folder of its own, removed when it returns. A process forked from the server
    ends without running its exit handlers, which is where coremltools removes the temporary package of every
    model it converts (1.7 GB for a UNet): without this they would stay in /tmp. The folder's name carries the
    process id, so that one left by a killed step can be told from a running step's (`remove_stale_step_folders`)."""
    folder = tempfile.mkdtemp(prefix=f"{STEP_FOLDER_PREFIX}{os.getpid()}-")
    tempfile.tempdir = folder
    try:
        return function(*args, **kwargs)
    finally:
        tempfile.tempdir = None
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_step_folders(root: Path | None = None) -> int:
    """Remove the temp folders of isolated steps whose process is gone (killed: its `finally` never ran; a UNet
    step leaves GBs there). Returns how many were removed."""
    removed = 0
    for folder in Path(root or tempfile.gettempdir()).glob(f"{STEP_FOLDER_PREFIX}*"):
        pid = folder.name.removeprefix(STEP_FOLDER_PREFIX).split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def run_isolated(function: Callable[..., T], *args: Any, threads: int | None = None, **kwargs: Any) -> T:
    """Run `function` in a process of its own (its memory is the OS's again once it returns; so are its
    temporary files). `threads`: torch's intra-op threads there (None: its default, one per core)."""
    with _pool(threads) as pool:
        return pool.submit(_in_own_temp_folder, function, *args, **kwargs).result()


def convert_isolated(*args: Any, **kwargs: Any) -> ConvertResult:
    return run_isolated(convert_component, *args, **kwargs)
