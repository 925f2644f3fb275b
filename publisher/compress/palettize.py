"""Palettize a float16 `.mlpackage`: each large weight becomes a constexpr_lut_to_dense op.

The program is edited directly (one op replaced per weight) and serialised once, instead of running
coremltools' whole optimisation pass pipeline; the LUTs are the exact 1-D k-means optimum (publisher.compress.kmeans).
The report is computed from the saved package read back from disk: the bytes that ship.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from publisher.compress.kmeans import palettize_grouped, palettize_tensor
from publisher.compress.packing import pack_indices, unpack_indices
from publisher.convert.coreml import import_coremltools, save_package
from publisher.errors import PublisherError
from publisher.manifest import DeploymentTarget, Granularity
from publisher.metrics import snr

# Below this many elements a weight stays float16 (the LUT would not pay for itself); coremltools' default too.
MIN_ELEMENTS = 2048
# The embedding table is looked up, not multiplied: Apple's converter leaves it float16.
_LOOKUP_OPS = {"gather", "gather_nd", "gather_along_axis"}
SUPPORTED_NBITS = (1, 2, 4, 6, 8)


class PalettizeError(PublisherError):
    """The input cannot be palettized as asked."""


@dataclass(frozen=True)
class PalettizeConfig:
    nbits: int
    granularity: Granularity = Granularity.PER_TENSOR
    group_size: int = 16
    recipe: Mapping[str, int] = field(default_factory=dict)  # op name or fnmatch pattern -> nbits (0: keep float16)
    min_elements: int = MIN_ELEMENTS
    deployment_target: DeploymentTarget | None = None

    def nbits_for(self, op_name: str) -> int:
        if op_name in self.recipe:
            return int(self.recipe[op_name])
        for pattern, bits in self.recipe.items():
            if fnmatch.fnmatchcase(op_name, pattern):
                return int(bits)
        return self.nbits


def load_recipe(path: Path) -> dict[str, int]:
    """A mixed-bit recipe: JSON object {op name or pattern: nbits}; 0 keeps that weight float16."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PalettizeError(f"{path}: cannot read the recipe: {exc}") from exc
    if not isinstance(data, dict):
        raise PalettizeError(f"{path}: a recipe is a JSON object of op name -> nbits")
    for name, bits in data.items():
        if bits not in (0, *SUPPORTED_NBITS):
            raise PalettizeError(f"{path}: {name}: nbits must be one of 0, 1, 2, 4, 6, 8, not {bits!r}")
    return {str(k): int(v) for k, v in data.items()}


def _candidates(function: Any, min_elements: int) -> list[Any]:
    ops = []
    for op in function.operations:
        if op.op_type != "const":
            continue
        value = op.outputs[0].val
        if not isinstance(value, np.ndarray) or value.dtype != np.float16 or value.size < min_elements:
            continue
        if value.ndim < 2:  # biases and norms stay float16, as in Apple's converter
            continue
        if any(child.op_type in _LOOKUP_OPS for child in op.outputs[0].child_ops):
            continue
        ops.append(op)
    return ops


def _check_float16_program(program: Any, package: Path) -> None:
    function = program.functions["main"]
    fp32_weights = [op.name for op in function.operations if op.op_type == "const"
                    and isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.dtype == np.float32
                    and op.outputs[0].val.size >= MIN_ELEMENTS]
    if fp32_weights:
        raise PalettizeError(f"{package}: not a float16 ML Program ({len(fp32_weights)} float32 weights, e.g. "
                             f"{fp32_weights[0]})")
    if any(op.op_type.startswith("constexpr_") for op in function.operations):
        raise PalettizeError(f"{package}: already compressed (constexpr ops present)")


def _copy_descriptions(source_model: Any, model: Any) -> None:
    model.short_description = source_model.short_description
    model.author = source_model.author
    model.license = source_model.license
    model.version = source_model.version
    for name in source_model.input_description:
        model.input_description[name] = source_model.input_description[name]
    for name in source_model.output_description:
        model.output_description[name] = source_model.output_description[name]
    model.user_defined_metadata.update(dict(source_model.user_defined_metadata))


def _replace(function: Any, op: Any, solution: Any, config: PalettizeConfig, originals: dict[str, np.ndarray],
             mb: Any, types: Any, ct: Any) -> None:
    """Put a constexpr_lut_to_dense op in place of one float16 weight."""
    value = op.outputs[0].val
    name = op.name
    bits = config.nbits_for(name)
    op.name = name + "_float16"
    if isinstance(solution, tuple):  # one LUT per group of channels (iOS18)
        luts, indices = solution
        lut_shape = [luts.shape[0]] + [1] * (value.ndim - 1) + [1 << bits, 1]
        index_dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{bits}"))
        new = mb.constexpr_lut_to_dense(indices=indices.astype(index_dtype), lut=luts.reshape(lut_shape),
                                        before_op=op, name=name)
    elif function.opset_version >= ct.target.iOS18:
        index_dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{bits}"))
        lut_shape = [1] * value.ndim + [1 << bits, 1]
        new = mb.constexpr_lut_to_dense(indices=solution.indices.astype(index_dtype),
                                        lut=solution.lut.reshape(lut_shape), before_op=op, name=name)
    else:
        new = mb.constexpr_lut_to_dense(indices=pack_indices(solution.indices, bits), lut=solution.lut,
                                        shape=np.array(value.shape, dtype=np.uint32), before_op=op, name=name)
    function.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
    function.remove_ops([op])
    originals[name] = value


def palettize_package(source: Path, output: Path, config: PalettizeConfig, progress: bool = True) -> dict[str, Any]:
    """Write a palettized copy of `source` to `output`; returns the report (see `read_report_from_package`)."""
    from tqdm import tqdm

    from publisher.mlpackage import load_model, load_program

    ct = import_coremltools()
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    for bits in {config.nbits, *config.recipe.values()} - {0}:
        if bits not in SUPPORTED_NBITS:
            raise PalettizeError(f"nbits must be one of {', '.join(map(str, SUPPORTED_NBITS))}, not {bits}")
    start = time.perf_counter()
    source_model = load_model(source)
    if source_model.get_spec().WhichOneof("Type") != "mlProgram":
        raise PalettizeError(f"{source}: not an ML Program (neural network models cannot be palettized here)")
    program = load_program(source)
    _check_float16_program(program, source)
    function = program.functions["main"]
    target = config.deployment_target
    if target is not None:
        wanted = getattr(ct.target, target.value)
        if function.opset_version is None or wanted > function.opset_version:
            function.opset_version = wanted
    grouped = config.granularity is Granularity.PER_GROUPED_CHANNEL
    if grouped and function.opset_version < ct.target.iOS18:
        raise PalettizeError(f"{source}: per_grouped_channel needs an iOS18 program (convert with "
                             "minimum_deployment_target iOS18)")
    originals: dict[str, np.ndarray] = {}
    candidates = [op for op in _candidates(function, config.min_elements) if config.nbits_for(op.name) != 0]

    def solve(op: Any) -> Any:
        value, bits = op.outputs[0].val, config.nbits_for(op.name)
        if grouped and value.ndim >= 2 and value.shape[0] % config.group_size == 0:
            return palettize_grouped(value, bits, config.group_size, axis=0)
        return palettize_tensor(value, bits)

    # the solver (C, called through ctypes) and numpy release the GIL: two tensors at a time on two cores
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        solutions = pool.map(solve, candidates)
        bar = tqdm(zip(candidates, solutions, strict=True), total=len(candidates),
                   desc=f"palettize {Path(source).name}", unit="op", disable=not progress)
        with function:
            for op, solution in bar:
                _replace(function, op, solution, config, originals, mb, types, ct)
    if not originals:
        raise PalettizeError(f"{source}: no weight of {config.min_elements} or more float16 elements to palettize")
    model = ct.convert(program, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
                       minimum_deployment_target=function.opset_version, skip_model_load=True)
    _copy_descriptions(source_model, model)
    save_package(model, output)
    report = read_report_from_package(output, originals)
    report.update({"source": str(Path(source).name), "nbits": config.nbits, "granularity": config.granularity.value,
                   "group_size": config.group_size if grouped else None, "mixed": bool(config.recipe),
                   "seconds": round(time.perf_counter() - start, 2)})
    return report


def read_palettized_weights(package: Path, decoder: str = "project"
                            ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every constexpr_lut_to_dense op of a saved package: name -> (lut, indices as uint8 of the weight's shape,
    dense weight). With `decoder="coremltools"` coremltools itself decompresses each weight (the tests compare the
    two); by default it is the LUT lookup of the unpacked indices, several times faster."""
    from publisher.mlpackage import load_program, main_operations

    weights = {}
    for op in main_operations(load_program(package)):
        if op.op_type != "constexpr_lut_to_dense":
            continue
        lut = np.asarray(op.lut.val)
        if getattr(op, "shape", None) is not None:  # iOS16 form: packed bytes
            bits = int(math.log2(lut.size))
            indices = unpack_indices(op.indices.val, bits, int(np.prod(op.shape.val))).reshape(tuple(op.shape.val))
        else:  # iOS18 form: uintN tensor of the weight's shape
            indices = np.asarray(op.indices.val).astype(np.uint8)
        dense = op.materialized_val_inference() if decoder == "coremltools" else lut_lookup(lut, indices)
        weights[op.name] = (lut, indices, dense)
    return weights


def lut_lookup(lut: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Dense weight from a LUT and indices, for both the per-tensor and the grouped LUT layout."""
    palette = lut.shape[-2] if lut.ndim >= 2 else lut.size
    if lut.ndim <= 1 or lut.size == palette:
        return lut.reshape(-1)[indices]
    groups = lut.shape[0]
    flat = lut.reshape(groups, palette)
    per_group = indices.shape[0] // groups
    group_of_row = np.repeat(np.arange(groups), per_group).reshape((-1,) + (1,) * (indices.ndim - 1))
    return flat[np.broadcast_to(group_of_row, indices.shape), indices]


def read_report_from_package(package: Path, originals: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per-op figures read back from the package: LUT size, bits, and (given the float16 originals) weight SNR."""
    ops = []
    total_elements = 0
    for name, (lut, indices, dense) in sorted(read_palettized_weights(package).items()):
        palette = lut.shape[-2] if lut.ndim >= 2 else lut.size
        entry: dict[str, Any] = {"op": name, "shape": list(indices.shape), "nbits": int(math.log2(palette)),
                                 "luts": int(lut.size // palette)}
        if originals is not None and name in originals:
            entry["snr_db"] = round(snr(originals[name], dense), 4)
        ops.append(entry)
        total_elements += int(indices.size)
    size = sum(p.stat().st_size for p in Path(package).rglob("*") if p.is_file())
    snrs = [op["snr_db"] for op in ops if "snr_db" in op and math.isfinite(op["snr_db"])]
    return {"package": Path(package).name, "palettized_ops": len(ops), "palettized_elements": total_elements,
            "package_bytes": size, "min_snr_db": min(snrs) if snrs else None,
            "mean_snr_db": round(float(np.mean(snrs)), 4) if snrs else None, "ops": ops}
