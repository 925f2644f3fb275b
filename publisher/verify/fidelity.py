"""Output fidelity of a package: the same seeded inputs through the package's program and through PyTorch.

float16 packages are compared with the float32 diffusers module (Apple's bar: PSNR >= 35 dB). Palettized packages
are compared with the module running the very weights the package decodes to (>= 35 dB: the graph is right), and
their PSNR against the float model is reported alongside.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from publisher.errors import ToolchainError
from publisher.manifest import Attention, Component
from publisher.metrics import psnr

PSNR_BAR_DB = 35.0


@dataclass
class Fidelity:
    submodule: str
    runtime: str
    psnr_db: dict[str, float]  # per output, against the reference the bar applies to
    psnr_vs_float_db: dict[str, float] | None = None  # palettized packages: against the float model
    notes: list[str] = field(default_factory=list)

    @property
    def min_psnr_db(self) -> float:
        return min(self.psnr_db.values())

    @property
    def passed(self) -> bool:
        return self.min_psnr_db >= PSNR_BAR_DB

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"submodule": self.submodule, "runtime": self.runtime, "bar_db": PSNR_BAR_DB,
                                "psnr_db": {k: round(v, 2) for k, v in self.psnr_db.items()},
                                "min_psnr_db": round(self.min_psnr_db, 2), "passed": self.passed}
        if self.psnr_vs_float_db is not None:
            data["psnr_vs_float_db"] = {k: round(v, 2) for k, v in self.psnr_vs_float_db.items()}
        return data


def _reference(source: Path, submodule: str, attention: Attention, resolution: int) -> tuple[Any, tuple, list[str]]:
    """(PyTorch module, inputs, output names) for a submodule, chunks included."""
    import torch

    from publisher.convert.chunk import UnetChunk1, UnetChunk2, chunk_specs
    from publisher.convert.components import example_inputs, load_component

    component = Component.UNET if submodule.startswith("unet") else Component(submodule)
    loaded = load_component(source, component, attention, resolution)
    example = example_inputs(loaded.spec)
    if submodule == "unet_chunk1":
        specs, _ = chunk_specs(loaded.module, loaded.spec.inputs, loaded.spec.outputs, example)
        return UnetChunk1(loaded.module, specs.cut), example, [t.name for t in specs.chunk1_outputs]
    if submodule == "unet_chunk2":
        specs, intermediates = chunk_specs(loaded.module, loaded.spec.inputs, loaded.spec.outputs, example)
        with torch.no_grad():
            inputs = (example[2], *intermediates)
        return UnetChunk2(loaded.module, specs.cut), inputs, [t.name for t in specs.chunk2_outputs]
    return loaded.module, example, [t.name for t in loaded.spec.outputs]


def _torch_outputs(module: Any, inputs: tuple, names: list[str]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        result = module(*inputs)
    result = result if isinstance(result, tuple) else (result,)
    return {name: r.float().numpy() for name, r in zip(names, result, strict=True)}


def _declared_inputs(package: Path) -> list[tuple[str, str]]:
    from publisher.mlpackage import package_info

    return [(t.name, t.dtype) for t in package_info(package).inputs]


def _run(package: Path, inputs: tuple, runtime: str) -> dict[str, np.ndarray]:
    declared = _declared_inputs(package)
    if runtime == "coreml":
        if platform.system() != "Darwin":
            raise ToolchainError("Core ML predictions need macOS; on Linux use the reference executor "
                                 "(--runtime reference)")
        from publisher.convert.coreml import import_coremltools

        ct = import_coremltools()
        model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY)
        # fed in the declared dtypes, as Apple's pipeline does (the values are already representable in them)
        feed = {name: np.asarray(x.numpy(), dtype=np.dtype(dtype)) for (name, dtype), x in zip(declared, inputs,
                                                                                              strict=True)}
        return {k: np.asarray(v, dtype=np.float32) for k, v in model.predict(feed).items()}
    feed = {name: np.asarray(x.numpy(), dtype=np.float32) for (name, _), x in zip(declared, inputs, strict=True)}
    from publisher.verify.executor import run_package

    return run_package(package, feed)


def _dequantized_module(module: Any, package: Path, float16_package: Path | None) -> int:
    """Load the weights the palettized package decodes to into `module`. Each palettized weight is matched to
    its parameter through the float16 package's weights, byte for byte; without that package, to the parameter
    of the same size whose values are nearest. Returns how many parameters were replaced."""
    import torch

    from publisher.compress.palettize import read_palettized_weights
    from publisher.milfile import const_values

    params = list(module.parameters())
    originals = const_values(float16_package) if float16_package is not None else {}
    by_bytes: dict[bytes, list[Any]] = {}
    by_size: dict[int, list[Any]] = {}
    for param in params:
        if float16_package is not None:
            by_bytes.setdefault(param.detach().half().numpy().tobytes(), []).append(param)
        by_size.setdefault(param.numel(), []).append(param)
    replaced = 0
    for name, (_, _, dense) in read_palettized_weights(package).items():
        values = np.asarray(dense, dtype=np.float32)
        if name in originals:
            targets = by_bytes.get(np.ascontiguousarray(originals[name]).tobytes(), [])
        else:
            candidates = by_size.get(values.size, [])
            flat = values.reshape(-1)
            targets = [min(candidates, key=lambda p: float(np.mean((p.detach().numpy().reshape(-1) - flat) ** 2)))] \
                if candidates else []
        for param in targets:
            with torch.no_grad():
                param.copy_(torch.from_numpy(values.reshape(param.shape)))
            replaced += 1
    return replaced


def verify_package(package: Path, source: Path, submodule: str, attention: Attention, resolution: int,
                   runtime: str = "reference", float16_package: Path | None = None) -> Fidelity:
    from publisher.compress.palettize import read_palettized_weights

    module, inputs, names = _reference(source, submodule, attention, resolution)
    got = _run(package, inputs, runtime)
    reference = _torch_outputs(module, inputs, names)
    float_psnr = {name: psnr(reference[name], got[name]) for name in names}
    if float16_package is None and not read_palettized_weights(package):
        return Fidelity(submodule, runtime, float_psnr)
    replaced = _dequantized_module(module, package, float16_package)
    dequantized = _torch_outputs(module, inputs, names)
    result = Fidelity(submodule, runtime, {name: psnr(dequantized[name], got[name]) for name in names},
                      psnr_vs_float_db=float_psnr)
    result.notes.append(f"{replaced} parameters replaced by their palettized values")
    return result
