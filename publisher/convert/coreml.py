"""Trace a component and convert it to a float16 ML Program `.mlpackage` with the contract's names.

`convert_component` is pure with respect to its arguments (source folder in, package folder out); `convert_isolated`
runs it in a fresh process so that one model's memory is returned to the system before the next starts.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from publisher.contract import ModelSpec, TensorSpec
from publisher.manifest import Attention, Component, DeploymentTarget

_PACKAGE_ID_NAMESPACE = uuid.UUID("6f1c3a52-1d0b-4a7e-9a63-5c1f2f3f8e11")
T = TypeVar("T")


def import_coremltools() -> Any:
    """Import coremltools without its Linux import noise (missing native proxy, untested torch version)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools

    return coremltools


@dataclass(frozen=True)
class PackageMetadata:
    """What goes into the package's description fields."""

    source: str  # repo@revision
    license: str
    attention: Attention
    author: str = "coreml-publisher"
    version: str = ""


@dataclass(frozen=True)
class ConvertResult:
    path: str
    inputs: list[str]
    outputs: list[str]


def deployment_target(ct: Any, target: DeploymentTarget) -> Any:
    return getattr(ct.target, target.value)


def normalize_package(package: Path) -> None:
    """Make a saved package's bytes a function of the model alone.

    coremltools writes fresh random UUIDs into Manifest.json on every save (derived here from the item paths
    instead), and protobuf serialises map fields (the user-defined metadata) in an order that changes from one
    process to the next (re-serialised here deterministically).
    """
    spec_path = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if spec_path.exists():
        import_coremltools()
        from coremltools.proto import Model_pb2

        spec = Model_pb2.Model()
        spec.ParseFromString(spec_path.read_bytes())
        spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    mapping = {old: str(uuid.uuid5(_PACKAGE_ID_NAMESPACE, f"{item['path']}\0{item['name']}"))
               for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {mapping[old]: item for old, item in sorted(manifest["itemInfoEntries"].items(),
                                                                               key=lambda kv: mapping[kv[0]])}
    manifest["rootModelIdentifier"] = mapping[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def save_package(model: Any, output: Path) -> None:
    """Save atomically: into a temp folder beside the target, normalise, then rename over it."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        package = staging / output.name
        model.save(str(package))
        normalize_package(package)
        if output.exists():
            shutil.rmtree(output)
        os.replace(package, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def describe(model: Any, spec_inputs: Sequence[TensorSpec], spec_outputs: Sequence[TensorSpec], description: str,
             metadata: PackageMetadata) -> None:
    model.short_description = f"{description} ({metadata.attention.value} attention) converted from {metadata.source}"
    model.author = metadata.author
    model.license = metadata.license
    model.version = metadata.version or metadata.source
    for tensor in spec_inputs:
        model.input_description[tensor.name] = f"{tensor.description}, shape {list(tensor.shape)}"
    for tensor in spec_outputs:
        model.output_description[tensor.name] = f"{tensor.description}, shape {list(tensor.shape)}"
    model.user_defined_metadata.update({
        "com.github.coreml-publisher.source": metadata.source,
        "com.github.coreml-publisher.attention": metadata.attention.value,
    })


def trace(module: Any, inputs: tuple[Any, ...]) -> Any:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, inputs, check_trace=False, strict=False)


def to_mlprogram(traced: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 target: DeploymentTarget) -> Any:
    import numpy as np

    ct = import_coremltools()
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name=t.name, shape=t.shape, dtype=np.float32) for t in inputs],
        # float32 outputs, like the inputs: the apps and the next chunk read float32 arrays
        outputs=[ct.TensorType(name=t.name, dtype=np.float32) for t in outputs],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=deployment_target(ct, target),
        skip_model_load=True,  # Core ML cannot load models on Linux; nothing here needs it loaded
    )


def convert_module(module: Any, spec: ModelSpec, example: tuple[Any, ...], target: DeploymentTarget,
                   metadata: PackageMetadata, output: Path, spec_inputs: Sequence[TensorSpec] | None = None,
                   spec_outputs: Sequence[TensorSpec] | None = None) -> ConvertResult:
    inputs = list(spec_inputs or spec.inputs)
    outputs = list(spec_outputs or spec.outputs)
    traced = trace(module, example)
    del module
    gc.collect()  # the traced graph holds the weights it needs; drop everything else before converting
    model = to_mlprogram(traced, inputs, outputs, target)
    del traced
    gc.collect()
    describe(model, inputs, outputs, spec.description, metadata)
    save_package(model, output)
    return ConvertResult(path=str(output), inputs=[t.name for t in inputs], outputs=[t.name for t in outputs])


def convert_component(source: Path, component: Component, attention: Attention, resolution: int,
                      target: DeploymentTarget, output: Path, metadata: PackageMetadata) -> ConvertResult:
    """Convert one component of a diffusers checkpoint folder to `output` (an .mlpackage folder)."""
    from publisher.convert.components import example_inputs, load_component

    loaded = load_component(Path(source), component, attention, resolution, label=metadata.source)
    example = example_inputs(loaded.spec)
    spec = loaded.spec
    module = loaded.module
    del loaded
    return convert_module(module, spec, example, target, metadata, Path(output))


def _child_init() -> None:
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


@contextlib.contextmanager
def _pool() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_child_init) as pool:
        yield pool


def run_isolated(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `function` in a fresh spawned process (its memory is the OS's again once it returns)."""
    with _pool() as pool:
        return pool.submit(function, *args, **kwargs).result()


def convert_isolated(*args: Any, **kwargs: Any) -> ConvertResult:
    return run_isolated(convert_component, *args, **kwargs)
