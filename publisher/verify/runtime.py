"""Where a package runs for verification: Core ML itself (macOS) or the reference MIL executor (any OS).

Both take the package and the inputs by name and return the outputs by name as float32 arrays; neither loads a
PyTorch model (the executor uses torch's CPU kernels for a few ops, nothing more). Each call loads the model and
releases it before returning, so a build directory is verified one model at a time.
"""

from __future__ import annotations

import gc
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from publisher.errors import ToolchainError

Model = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class Runtime(Protocol):
    name: str

    def run(self, package: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def open(self, package: Path) -> Model:
        """The package loaded once, for many predictions (a generation's denoising steps); inputs it does not
        declare are ignored, the others are fed as their declared dtype holds them."""
        ...


def _declared(package: Path) -> dict[str, str]:
    from publisher.mlpackage import package_info

    return {t.name: t.dtype for t in package_info(package).inputs}


class ExecutorRuntime:
    """The project's MIL executor: float32 numerics (the inputs' values are already what the declared dtypes
    hold)."""

    name = "reference"

    def run(self, package: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from publisher.verify.executor import run_package

        outputs = run_package(package, {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()})
        gc.collect()
        return outputs

    def open(self, package: Path) -> Model:
        from publisher.mlpackage import load_program
        from publisher.verify.executor import run_program

        program, declared = load_program(package), _declared(package)

        def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return run_program(program, {name: np.asarray(inputs[name], dtype=declared[name]).astype(np.float32)
                                         for name in declared})

        return predict


class CoreMLRuntime:
    """Core ML predictions through coremltools, the inputs fed in the package's declared dtypes (as Apple's
    pipeline feeds them)."""

    name = "coreml"

    def run(self, package: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        predict = self.open(package)
        try:
            return predict(inputs)
        finally:
            del predict
            gc.collect()

    def open(self, package: Path, compute_units: str = "CPU_ONLY") -> Model:
        if platform.system() != "Darwin":
            raise ToolchainError("Core ML predictions need macOS; on Linux use the reference executor "
                                 "(--runtime executor)")
        from publisher.mlpackage import import_coremltools

        ct = import_coremltools()
        declared = _declared(package)
        model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, compute_units))

        def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            feed = {name: np.asarray(inputs[name], dtype=np.dtype(dtype)) for name, dtype in declared.items()}
            return {k: np.asarray(v, dtype=np.float32) for k, v in model.predict(feed).items()}

        return predict


# "executor" is the reference executor's other name (`publisher generate --runtime executor`)
RUNTIMES: dict[str, type[Runtime]] = {"reference": ExecutorRuntime, "executor": ExecutorRuntime,
                                      "coreml": CoreMLRuntime}


def runtime_named(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ToolchainError(f"--runtime must be one of {', '.join(RUNTIMES)}, not '{name}'")
    return RUNTIMES[name]()
