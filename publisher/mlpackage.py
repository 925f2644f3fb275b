"""Reading saved `.mlpackage` folders back on Linux: interface (names, shapes, dtypes) and the MIL program."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from publisher.convert.coreml import import_coremltools
from publisher.milfile import PackageFiles, read_spec

_DTYPES = {65552: "float16", 65568: "float32", 65600: "float64", 131104: "int32"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class PackageInfo:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    specification_version: int
    is_mlprogram: bool
    metadata: dict[str, str]


def _tensor(feature: Any) -> TensorInfo:
    array = feature.type.multiArrayType
    return TensorInfo(feature.name, tuple(int(d) for d in array.shape), _DTYPES.get(array.dataType, str(array.dataType)))


def package_info(package: Path) -> PackageInfo:
    # the spec is read from its file: opening the package with coremltools' MLModel rewrites Manifest.json (same
    # bytes, new mtime), and stored outputs are trusted by their files' stamps
    spec = read_spec(package)
    description = spec.description
    return PackageInfo(
        inputs=tuple(_tensor(f) for f in description.input),
        outputs=tuple(_tensor(f) for f in description.output),
        specification_version=int(spec.specificationVersion),
        is_mlprogram=spec.WhichOneof("Type") == "mlProgram",
        metadata=dict(description.metadata.userDefined),
    )


def load_program(package: Path) -> Any:
    """The MIL program inside a saved package (weights read from its weights folder)."""
    import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = read_spec(package)
    return load(spec, specification_version=spec.specificationVersion,
                file_weights_dir=str(PackageFiles.of(package).weights))


def main_operations(program: Any) -> list[Any]:
    return list(program.functions["main"].operations)
