"""A saved ML Program package read and written at the file level: the model spec (protobuf) and the weight file.

Loading a package as a MIL program (coremltools' milproto loader) and serialising it again costs seconds per
gigabyte of weights and runs coremltools' whole export path. Compression only needs the list of operations and
the weight blobs, so this module reads and writes those directly, with coremltools' own protobuf classes and
blob storage reader/writer (the format Core ML reads).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from publisher.mlpackage import PackageFiles, PackageFormatError, import_coremltools, read_spec, staged_package

WEIGHT_FILE_REFERENCE = "@model_path/weights/weight.bin"
WEIGHT_FILE_NAME = "weight.bin"
# blob storage method suffix and numpy dtype per MIL data type (sub-byte types are read unpacked, one per uint8)
_BLOB_TYPES: dict[str, tuple[str, Any]] = {
    "FLOAT16": ("fp16", np.float16), "FLOAT32": ("float", np.float32), "UINT8": ("uint8", np.uint8),
    "INT8": ("int8", np.int8), "UINT16": ("uint16", np.uint16), "INT16": ("int16", np.int16),
    "INT32": ("int32", np.int32), "UINT32": ("uint32", np.uint32), "INT4": ("int4", np.int8),
    "UINT1": ("uint1", np.uint8), "UINT2": ("uint2", np.uint8), "UINT3": ("uint3", np.uint8),
    "UINT4": ("uint4", np.uint8), "UINT6": ("uint6", np.uint8),
}
_SUB_BYTE = {"UINT1", "UINT2", "UINT3", "UINT4", "UINT6", "INT4"}  # packed in immediate bytes: not read here


def main_block(spec: Any, package: Path) -> Any:
    """The operations block of the program's `main` function."""
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackageFormatError(f"{package}: not an ML Program (neural network models are not supported here)")
    functions = spec.mlProgram.functions
    if set(functions) != {"main"}:
        raise PackageFormatError(f"{package}: expected one function `main`, found {', '.join(sorted(functions))}")
    function = functions["main"]
    return function.block_specializations[function.opset]


def walk_operations(block: Any) -> Iterator[Any]:
    """Every operation of a block, nested blocks (cond, while) included, in program order."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from walk_operations(inner)


def blob_values(op: Any) -> Iterator[Any]:
    """The Values of an op that live in the weight file (attributes and inline input bindings)."""
    for value in op.attributes.values():
        if value.WhichOneof("value") == "blobFileValue":
            yield value
    for argument in op.inputs.values():
        for binding in argument.arguments:
            if binding.WhichOneof("binding") == "value" and binding.value.WhichOneof("value") == "blobFileValue":
                yield binding.value


def set_specification_version(spec: Any, version: int) -> None:
    """Raise the program's deployment target: spec version and opset name (the ops themselves are unchanged)."""
    from coremltools import _OPSET

    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    opset = _OPSET[version]
    function.block_specializations[opset].CopyFrom(block)
    if function.opset != opset:
        del function.block_specializations[function.opset]
    function.opset = opset
    spec.specificationVersion = version


def operand_values(op: Any) -> dict[str, Any]:
    """An op's constant operands by name: its attributes, and inputs bound to an inline value (the iOS18 form of
    constexpr ops)."""
    values = dict(op.attributes)
    for key, argument in op.inputs.items():
        if len(argument.arguments) == 1 and argument.arguments[0].WhichOneof("binding") == "value":
            values[key] = argument.arguments[0].value
    return values


def data_type_name(value_type: Any) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(value_type.tensorType.dataType)


def value_shape(value_type: Any) -> tuple[int, ...]:
    return tuple(int(d.constant.size) for d in value_type.tensorType.dimensions)


def op_name(op: Any) -> str:
    """The MIL op name (its `name` attribute; an op's output may be named differently)."""
    return op.attributes["name"].immediateValue.tensor.strings.values[0]


class WeightReader:
    """Blobs of one weight file, returned as numpy arrays in the tensor's shape and dtype."""

    def __init__(self, files: PackageFiles) -> None:
        import_coremltools()
        from coremltools.libmilstoragepython import _BlobStorageReader

        self._path = files.weights / WEIGHT_FILE_NAME
        self._reader = _BlobStorageReader(str(self._path))

    def read(self, value: Any) -> np.ndarray:
        """The tensor of a Value, whether stored in the weight file or immediate."""
        if value.WhichOneof("value") == "immediateValue":
            return _immediate_tensor(value)
        reference = value.blobFileValue
        if Path(reference.fileName).name != WEIGHT_FILE_NAME:
            raise PackageFormatError(f"{self._path.parent}: unexpected weight file {reference.fileName}")
        dtype_name = data_type_name(value.type)
        if dtype_name not in _BLOB_TYPES:
            raise PackageFormatError(f"{self._path}: unsupported blob data type {dtype_name}")
        suffix, dtype = _BLOB_TYPES[dtype_name]
        data = getattr(self._reader, f"read_{suffix}_data")(reference.offset)
        return data.view(dtype).reshape(value_shape(value.type))


def const_values(package: Path) -> dict[str, np.ndarray]:
    """The tensor of every const op of `main` (op name -> array), read from the package's files."""
    reader = WeightReader(PackageFiles.of(package))
    return {op_name(op): reader.read(op.attributes["val"]) for op in main_block(read_spec(package), package).operations
            if op.type == "const" and op.attributes["val"].type.WhichOneof("type") == "tensorType"}


def const_digests(package: Path) -> dict[str, str]:
    """sha256 of every const tensor of `main` (op name -> hex digest of its bytes), read one at a time."""
    import hashlib

    reader = WeightReader(PackageFiles.of(package))
    return {op_name(op): hashlib.sha256(np.ascontiguousarray(reader.read(op.attributes["val"])).tobytes()).hexdigest()
            for op in main_block(read_spec(package), package).operations
            if op.type == "const" and op.attributes["val"].type.WhichOneof("type") == "tensorType"}


class WeightWriter:
    """A new weight file; `write` appends a blob and returns the proto Value that refers to it."""

    def __init__(self, path: Path) -> None:
        import_coremltools()
        from coremltools.libmilstoragepython import _BlobStorageWriter

        self._writer = _BlobStorageWriter(str(path), truncate_file=True)

    def write(self, array: np.ndarray, dtype_name: str) -> Any:
        from coremltools.converters.mil.backend.mil.helper import create_file_value_tensor
        from coremltools.proto import MIL_pb2

        suffix = _BLOB_TYPES[dtype_name][0]
        flat = np.ascontiguousarray(array).reshape(-1)
        if suffix == "fp16":  # the writer takes float16 as its bit patterns
            flat = flat.view(np.uint16)
        offset = getattr(self._writer, f"write_{suffix}_data")(flat)
        return create_file_value_tensor(WEIGHT_FILE_REFERENCE, offset, list(array.shape),
                                        MIL_pb2.DataType.Value(dtype_name))

    def close(self) -> None:
        del self._writer  # the writer flushes and closes the file when destroyed


def _immediate_tensor(value: Any) -> np.ndarray:
    tensor = value.immediateValue.tensor
    dtype_name = data_type_name(value.type)
    shape = value_shape(value.type)
    field = tensor.WhichOneof("value")
    if field == "bytes":
        if dtype_name not in _BLOB_TYPES or dtype_name in _SUB_BYTE:
            raise PackageFormatError(f"immediate {dtype_name} tensors are not supported here")
        return np.frombuffer(tensor.bytes.values, dtype=_BLOB_TYPES[dtype_name][1]).reshape(shape)
    return np.asarray(list(getattr(tensor, field).values)).reshape(shape)


def write_package(source: Path, spec: Any, weights: Path, output: Path) -> None:
    """Assemble a package from a spec and a finished weight file, atomically (temp folder, then rename).
    Manifest.json comes from `source` and the result is normalised as every package the project writes."""
    files = PackageFiles.of(source)
    with staged_package(output) as package:
        spec_path = package / files.spec.relative_to(files.package)
        weights_dir = package / files.weights.relative_to(files.package)
        weights_dir.mkdir(parents=True)
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files.package / "Manifest.json", package / "Manifest.json")
        spec_path.write_bytes(spec.SerializeToString(deterministic=True))
        os.replace(weights, weights_dir / WEIGHT_FILE_NAME)
