"""Palettize a float16 `.mlpackage`: each large weight becomes a constexpr_lut_to_dense op.

The program is edited directly (one op replaced per weight) and serialised once, instead of running
coremltools' whole optimisation pass pipeline; the LUTs are the exact 1-D k-means optimum (publisher.compress.kmeans).
The report is computed from the saved package read back from disk: the bytes that ship.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from publisher.compress.kmeans import palettize_grouped, palettize_tensor
from publisher.compress.lut import lut_lookup, lut_snr
from publisher.compress.packing import pack_indices, unpack_indices
from publisher.deployment import DeploymentTarget
from publisher.errors import PublisherError
from publisher.mlpackage import import_coremltools

# Below this many elements a weight stays float16 (the LUT would not pay for itself); coremltools' default too.
MIN_ELEMENTS = 2048
# The embedding table is looked up, not multiplied: Apple's converter leaves it float16.
_LOOKUP_OPS = {"gather", "gather_nd", "gather_along_axis"}
SUPPORTED_NBITS = (1, 2, 4, 6, 8)


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_GROUPED_CHANNEL = "per_grouped_channel"


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


FINGERPRINT_VALUES = 64


def weight_fingerprint(value: np.ndarray) -> list[float]:
    """The first values of a weight, scaled to unit norm: the converter may fold a constant into a weight (the
    attention scale into `to_q`), which changes its bytes but not its direction."""
    head = np.asarray(value, dtype=np.float32).reshape(-1)[:FINGERPRINT_VALUES]
    norm = float(np.linalg.norm(head))
    return [round(float(v), 6) for v in (head / norm if norm else head)]


def recipe_for_package(package: Path, layers: Iterable[Mapping[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """A recipe over a PyTorch model's layers (`sha256` of each float16 weight's bytes, `size`, `fingerprint`,
    `nbits`) -> (the same recipe keyed by the package's op names, their sizes in elements). A layer is found by its
    bytes, else by the op of its size whose fingerprint points the same way (a folded scale); others are left out."""
    from publisher.milfile import PackageFiles, WeightReader, main_block, op_name, read_spec

    reader = WeightReader(PackageFiles.of(package))
    ops: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    for op in main_block(read_spec(package), package).operations:
        if _is_float16_weight(op):
            value = np.ascontiguousarray(reader.read(op.attributes["val"]))
            ops[op_name(op)] = value
            digests.setdefault(hashlib.sha256(value.tobytes()).hexdigest(), op_name(op))
    recipe, sizes = {}, {}
    unmatched = []
    for layer in layers:
        name = digests.get(layer["sha256"])
        if name is not None and name not in recipe:
            recipe[name], sizes[name] = int(layer["nbits"]), int(ops[name].size)
        else:
            unmatched.append(layer)
    for layer in unmatched:
        wanted = np.asarray(layer.get("fingerprint") or [], dtype=np.float32)
        best, best_cosine = None, 0.999
        for name, value in ops.items():
            if name in recipe or value.size != layer["size"] or not wanted.size:
                continue
            cosine = abs(float(np.dot(wanted, np.asarray(weight_fingerprint(value), dtype=np.float32))))
            if cosine > best_cosine:
                best, best_cosine = name, cosine
        if best is not None:
            recipe[best], sizes[best] = int(layer["nbits"]), int(ops[best].size)
    return recipe, sizes


def _lookup_inputs(block: Any) -> set[str]:
    """Names of the values that lookup ops (the embedding table's gather) read."""
    from publisher.milfile import walk_operations

    names: set[str] = set()
    for op in walk_operations(block):
        if op.type in _LOOKUP_OPS:
            names.update(binding.name for argument in op.inputs.values() for binding in argument.arguments
                         if binding.name)
    return names


def _is_float16_weight(op: Any) -> bool:
    from publisher.milfile import data_type_name

    value = op.attributes["val"] if op.type == "const" else None
    return value is not None and value.WhichOneof("value") == "blobFileValue" and data_type_name(value.type) == "FLOAT16"


def _candidates(block: Any, config: PalettizeConfig) -> list[Any]:
    from publisher.milfile import op_name, value_shape

    lookups = _lookup_inputs(block)
    chosen = []
    for op in block.operations:
        if not _is_float16_weight(op):
            continue
        shape = value_shape(op.attributes["val"].type)
        if math.prod(shape) < config.min_elements or len(shape) < 2:  # biases and norms stay float16, as in Apple's
            continue
        if op.outputs[0].name in lookups or config.nbits_for(op_name(op)) == 0:
            continue
        chosen.append(op)
    return chosen


def _check_float16_program(block: Any, package: Path) -> None:
    from publisher.milfile import data_type_name, op_name, value_shape, walk_operations

    fp32_weights = [op_name(op) for op in walk_operations(block) if op.type == "const"
                    and data_type_name(op.attributes["val"].type) == "FLOAT32"
                    and math.prod(value_shape(op.attributes["val"].type)) >= MIN_ELEMENTS]
    if fp32_weights:
        raise PalettizeError(f"{package}: not a float16 ML Program ({len(fp32_weights)} float32 weights, e.g. "
                             f"{fp32_weights[0]})")
    if any(op.type.startswith("constexpr_") for op in walk_operations(block)):
        raise PalettizeError(f"{package}: already compressed (constexpr ops present)")


@dataclass(frozen=True)
class _Solution:
    nbits: int
    lut: np.ndarray  # float16 in the shape the op stores
    indices: np.ndarray  # packed bytes (iOS16 form) or one uint8 per element in the weight's shape (iOS18 form)
    packed: bool


def _solve(value: np.ndarray, bits: int, config: PalettizeConfig, ios18: bool) -> _Solution:
    if config.granularity is Granularity.PER_GROUPED_CHANNEL and value.shape[0] % config.group_size == 0:
        luts, indices = palettize_grouped(value, bits, config.group_size, axis=0)
        return _Solution(bits, luts.reshape([luts.shape[0]] + [1] * (value.ndim - 1) + [1 << bits, 1]), indices, False)
    palette = palettize_tensor(value, bits)
    if ios18:  # iOS18 form: uintN indices in the weight's shape, LUT shaped for broadcasting
        return _Solution(bits, palette.lut.reshape([1] * value.ndim + [1 << bits, 1]), palette.indices, False)
    return _Solution(bits, palette.lut, pack_indices(palette.indices, bits), True)


def dense_palettized(value: np.ndarray, bits: int, granularity: Granularity = Granularity.PER_TENSOR,
                     group_size: int = 16) -> np.ndarray:
    """The float16 weight a package palettized at `bits` decodes to (the same LUTs and indices as palettize_package
    writes), for analyses that run the palettized weights in PyTorch."""
    config = PalettizeConfig(nbits=bits, granularity=granularity, group_size=group_size)
    solution = _solve(np.asarray(value, dtype=np.float16), bits, config, ios18=True)
    return lut_lookup(solution.lut, solution.indices).reshape(value.shape)


def _lut_operation(const: Any, name: str, shape: tuple[int, ...], solution: _Solution, writer: Any) -> Any:
    """The constexpr_lut_to_dense op that replaces one const: same output (name and type), so no consumer changes."""
    from coremltools.converters.mil.backend.mil.helper import create_scalar_value, create_tensor_value
    from coremltools.proto import MIL_pb2

    def tensor(array: np.ndarray, dtype_name: str) -> Any:
        # as coremltools' serializer: tensors of 10 or more elements go to the weight file
        return writer.write(array, dtype_name) if array.size >= 10 else create_tensor_value(array)

    op = MIL_pb2.Operation(type="constexpr_lut_to_dense")
    op.outputs.extend(const.outputs)
    op.attributes["name"].CopyFrom(create_scalar_value(name))
    if solution.packed:  # the iOS16 op: every operand is an attribute
        op.attributes["lut"].CopyFrom(tensor(solution.lut, "FLOAT16"))
        op.attributes["indices"].CopyFrom(writer.write(solution.indices, "UINT8"))
        op.attributes["shape"].CopyFrom(create_tensor_value(np.array(shape, dtype=np.uint32)))
    else:  # the iOS18 op: operands are inputs bound to inline values
        op.inputs["lut"].arguments.add().value.CopyFrom(tensor(solution.lut, "FLOAT16"))
        op.inputs["indices"].arguments.add().value.CopyFrom(writer.write(solution.indices, f"UINT{solution.nbits}"))
    return op


def _ordered_map(pool: ThreadPoolExecutor, function: Any, items: Iterable[Any], window: int) -> Iterator[Any]:
    """pool.map with at most `window` results waiting: memory stays bounded on packages of any size."""
    pending: deque[Any] = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write_palettized(source: Path, spec: Any, block: Any, candidates: list[Any], config: PalettizeConfig,
                      ios18: bool, output: Path, progress: bool) -> None:
    """Rewrite the candidates as LUT ops and write the new weight file in program order, then the package.
    (Its own function so that the source weights are unmapped before the report maps them again.)"""
    from tqdm import tqdm

    from publisher.milfile import (
        PackageFiles,
        WeightReader,
        WeightWriter,
        blob_values,
        data_type_name,
        op_name,
        value_shape,
        walk_operations,
        write_package,
    )

    reader = WeightReader(PackageFiles.of(source))

    def solve(op: Any) -> _Solution:
        try:
            return _solve(reader.read(op.attributes["val"]), config.nbits_for(op_name(op)), config, ios18)
        except ValueError as exc:
            raise PalettizeError(f"{source}: {op_name(op)}: {exc}") from exc

    output.parent.mkdir(parents=True, exist_ok=True)
    handle, weights_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".bin", dir=output.parent)
    os.close(handle)
    weights = Path(weights_name)
    try:
        writer = WeightWriter(weights)
        copied: dict[int, Any] = {}  # source offset -> value in the new file (a blob shared by two ops stays shared)
        chosen = {id(op) for op in candidates}
        # the solver and packing kernels release the GIL: two tensors at a time on two cores, written in order
        with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
            solutions = _ordered_map(pool, solve, candidates, window=8)
            bar = tqdm(total=len(candidates), desc=f"palettize {source.name}", unit="op", disable=not progress)
            for op in walk_operations(block):
                if id(op) in chosen:
                    shape = value_shape(op.attributes["val"].type)
                    op.CopyFrom(_lut_operation(op, op_name(op), shape, next(solutions), writer))
                    bar.update()
                    continue
                for value in blob_values(op):
                    offset = value.blobFileValue.offset
                    if offset not in copied:
                        copied[offset] = writer.write(reader.read(value), data_type_name(value.type))
                    value.CopyFrom(copied[offset])
            bar.close()
        writer.close()
        write_package(source, spec, weights, output)
    finally:
        weights.unlink(missing_ok=True)


def palettize_package(source: Path, output: Path, config: PalettizeConfig, progress: bool = True) -> dict[str, Any]:
    """Write a palettized copy of `source` to `output`; returns the report (see `read_report_from_package`)."""
    from publisher.milfile import main_block, op_name, read_spec, set_specification_version, walk_operations

    ct = import_coremltools()
    for bits in {config.nbits, *config.recipe.values()} - {0}:
        if bits not in SUPPORTED_NBITS:
            raise PalettizeError(f"nbits must be one of {', '.join(map(str, SUPPORTED_NBITS))}, not {bits}")
    start = time.perf_counter()
    source, output = Path(source), Path(output)
    spec = read_spec(source)
    block = main_block(spec, source)
    _check_float16_program(block, source)
    if config.deployment_target is not None:
        wanted = int(getattr(ct.target, config.deployment_target.value))
        if wanted > spec.specificationVersion:
            set_specification_version(spec, wanted)
            block = main_block(spec, source)
    ios18 = spec.specificationVersion >= int(ct.target.iOS18)
    if config.granularity is Granularity.PER_GROUPED_CHANNEL and not ios18:
        raise PalettizeError(f"{source}: per_grouped_channel needs an iOS18 program (convert with "
                             "minimum_deployment_target iOS18)")
    candidates = _candidates(block, config)
    if not candidates:
        raise PalettizeError(f"{source}: no weight of {config.min_elements} or more float16 elements to palettize")
    # the recipe's names no float16 weight of this package answers to (the variant checks them all), read before
    # the writer turns the chosen weights into lookup ops
    unmatched: list[str] = []
    if config.recipe:
        weights = {op_name(op) for op in walk_operations(block) if _is_float16_weight(op)}
        unmatched = sorted(key for key in config.recipe if key not in weights and not any(
            fnmatch.fnmatchcase(name, key) for name in weights))
    _write_palettized(source, spec, block, candidates, config, ios18, output, progress)
    report = read_report_from_package(output, source)
    if config.recipe:
        report["recipe_unmatched"] = unmatched
    report.update({"source": source.name, "nbits": config.nbits, "granularity": config.granularity.value,
                   "group_size": config.group_size if config.granularity is Granularity.PER_GROUPED_CHANNEL else None,
                   "mixed": bool(config.recipe), "seconds": round(time.perf_counter() - start, 2)})
    return report


def _read_lut_op(reader: Any, op: Any) -> tuple[np.ndarray, np.ndarray, tuple[int, ...] | None]:
    """The stored pieces of a constexpr_lut_to_dense op: LUT, stored indices, and the shape when packed (iOS16)."""
    from publisher.milfile import operand_values

    values = operand_values(op)
    shape = tuple(int(d) for d in reader.read(values["shape"])) if "shape" in values else None
    return reader.read(values["lut"]), reader.read(values["indices"]), shape


def _decode_indices(lut: np.ndarray, stored: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    """Indices as uint8 in the weight's shape: unpacked from the iOS16 bit stream, or the iOS18 uintN tensor."""
    if shape is None:
        return stored.astype(np.uint8, copy=False)
    return unpack_indices(stored, int(math.log2(lut.size)), math.prod(shape)).reshape(shape)


def decode_lut(lut: np.ndarray, stored: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    """The dense weight of a constexpr_lut_to_dense op from its stored pieces (see `_read_lut_op`)."""
    return lut_lookup(lut, _decode_indices(lut, stored, shape))


def _lut_ops(package: Path) -> tuple[Any, list[Any]]:
    from publisher.milfile import PackageFiles, WeightReader, main_block, read_spec

    block = main_block(read_spec(package), package)
    return WeightReader(PackageFiles.of(package)), [op for op in block.operations if op.type == "constexpr_lut_to_dense"]


def iter_palettized_weights(package: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Every constexpr_lut_to_dense op of a saved package, read from its files: (name, lut, indices as uint8 in
    the weight's shape), in program order."""
    from publisher.milfile import op_name

    reader, ops = _lut_ops(package)
    for op in ops:
        lut, stored, shape = _read_lut_op(reader, op)
        yield op_name(op), lut, _decode_indices(lut, stored, shape)


class DecodedWeights(Mapping[str, np.ndarray]):
    """The dense weights a palettized package decodes to, by op name, decoded one at a time as they are iterated
    (a dict of them all would hold a second copy of the model: 5 GB for SDXL's UNet in float16)."""

    def __init__(self, package: Path) -> None:
        from publisher.milfile import op_name

        self.package = Path(package)
        self._names = [op_name(op) for op in _lut_ops(self.package)[1]]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __getitem__(self, name: str) -> np.ndarray:
        for item, dense in self.items():
            if item == name:
                return dense
        raise KeyError(name)

    # a generator, not an ItemsView: each weight is decoded once, as it is read (verification streams them)
    def items(self) -> Iterator[tuple[str, np.ndarray]]:  # type: ignore[override]
        for name, lut, indices in iter_palettized_weights(self.package):
            yield name, lut_lookup(lut, indices)


def read_palettized_weights(package: Path, decoder: str = "project"
                            ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every constexpr_lut_to_dense op of a saved package: name -> (lut, indices as uint8 of the weight's shape,
    dense weight). With `decoder="coremltools"` coremltools itself loads the program and decompresses each weight
    (the tests compare the two); by default the package's files are read directly and the dense weight is the LUT
    lookup of the unpacked indices, several times faster."""
    weights = {name: (lut, indices, lut_lookup(lut, indices)) for name, lut, indices in iter_palettized_weights(package)}
    if decoder == "coremltools":
        from publisher.mlpackage import load_program, main_operations

        for op in main_operations(load_program(package)):
            if op.op_type == "constexpr_lut_to_dense":
                lut, indices, _ = weights[op.name]
                weights[op.name] = (lut, indices, op.materialized_val_inference())
    return weights


def read_report_from_package(package: Path, float16_package: Path | None = None) -> dict[str, Any]:
    """Per-op figures read back from the package: LUT size, bits, and (given the float16 package it was made from)
    the SNR of each dequantized weight against the original."""
    from publisher.milfile import PackageFiles, WeightReader, main_block, op_name, read_spec

    originals: dict[str, Any] = {}
    if float16_package is not None:
        originals = {op_name(op): op.attributes["val"] for op in main_block(read_spec(float16_package), float16_package
                                                                             ).operations if _is_float16_weight(op)}
        original_reader = WeightReader(PackageFiles.of(float16_package))
    reader, lut_ops = _lut_ops(package)

    def stored(op: Any) -> tuple[Any, ...]:  # file reads stay on this thread; decoding runs in the pool
        name = op_name(op)
        original = original_reader.read(originals[name]) if name in originals else None
        return (name, *_read_lut_op(reader, op), original)

    def measure(item: tuple[Any, ...]) -> dict[str, Any]:
        name, lut, stored_indices, shape, original = item
        indices = _decode_indices(lut, stored_indices, shape)
        palette = lut.shape[-2] if lut.ndim >= 2 else lut.size
        entry: dict[str, Any] = {"op": name, "shape": list(indices.shape), "nbits": int(math.log2(palette)),
                                 "luts": int(lut.size // palette)}
        if original is not None:
            entry["snr_db"] = round(lut_snr(original, lut, indices), 4)
        return entry

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        ops = sorted(_ordered_map(pool, measure, map(stored, lut_ops), window=4), key=lambda e: e["op"])
    size = sum(p.stat().st_size for p in Path(package).rglob("*") if p.is_file())
    snrs = [op["snr_db"] for op in ops if "snr_db" in op and math.isfinite(op["snr_db"])]
    return {"package": Path(package).name, "palettized_ops": len(ops),
            "palettized_elements": sum(math.prod(op["shape"]) for op in ops), "package_bytes": size,
            "min_snr_db": min(snrs) if snrs else None,
            "mean_snr_db": round(float(np.mean(snrs)), 4) if snrs else None, "ops": ops}
