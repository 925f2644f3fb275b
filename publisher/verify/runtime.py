"""Where a package runs for verification: Core ML itself (macOS) or the reference MIL executor (any OS).

Both take the package and the inputs by name and return the outputs by name as float32 arrays; neither loads a
PyTorch model (the executor uses torch's CPU kernels for a few ops, nothing more). Each call loads the model and
releases it before returning, so a build directory is verified one model at a time.
"""

from __future__ import annotations

import gc
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from publisher.errors import ToolchainError


class Runtime(Protocol):
    name: str

    def run(self, package: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class ExecutorRuntime:
    """The project's MIL executor: float32 numerics (the inputs' values are already what the declared dtypes
    hold)."""

    name = "reference"

    def run(self, package: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from publisher.verify.executor import run_package

        outputs = run_package(package, {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()})
        gc.collect()
        return outputs


class CoreMLRuntime:
    """Core ML predictions through coremltools, the inputs fed in the package's declared dtypes (as Apple's
    pipeline feeds them)."""

    name = "coreml"

    def run(self, package: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if platform.system() != "Darwin":
            raise ToolchainError("Core ML predictions need macOS; on Linux use the reference executor "
                                 "(--runtime reference)")
        from publisher.mlpackage import import_coremltools, package_info

        ct = import_coremltools()
        declared = {t.name: t.dtype for t in package_info(package).inputs}
        feed = {name: np.asarray(value, dtype=np.dtype(declared.get(name, "float32"))) for name, value in
                inputs.items()}
        model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY)
        try:
            return {k: np.asarray(v, dtype=np.float32) for k, v in model.predict(feed).items()}
        finally:
            del model
            gc.collect()


RUNTIMES: dict[str, type[Runtime]] = {"reference": ExecutorRuntime, "coreml": CoreMLRuntime}


def runtime_named(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ToolchainError(f"--runtime must be one of {', '.join(RUNTIMES)}, not '{name}'")
    return RUNTIMES[name]()
