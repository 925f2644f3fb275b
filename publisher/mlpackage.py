"""A `.mlpackage` on disk: coremltools imported quietly, the spec and weights located and read (interface: names,
shapes, dtypes; the MIL program), and packages written atomically with deterministic bytes. The low layer every stage
that touches packages builds on."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from publisher.errors import PublisherError

_PACKAGE_ID_NAMESPACE = uuid.UUID("6f1c3a52-1d0b-4a7e-9a63-5c1f2f3f8e11")


def import_coremltools() -> Any:
    """Import coremltools without its Linux import noise (missing native proxy, untested torch version)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools

    return coremltools


class PackageFormatError(PublisherError):
    """The package is not an ML Program this module can read."""


@dataclass(frozen=True)
class PackageFiles:
    package: Path
    spec: Path  # model.mlmodel
    weights: Path  # the weights folder

    @classmethod
    def of(cls, package: Path) -> PackageFiles:
        package = Path(package)
        try:
            manifest = json.loads((package / "Manifest.json").read_text())
            items = manifest["itemInfoEntries"]
            root = items[manifest["rootModelIdentifier"]]["path"]
        except (OSError, ValueError, KeyError) as exc:
            raise PackageFormatError(f"{package}: not a readable .mlpackage ({exc})") from exc
        spec = package / "Data" / root
        weights = spec.parent / "weights"
        for item in items.values():
            if item.get("name") == "weights":
                weights = package / "Data" / item["path"]
        return cls(package, spec, weights)


def read_spec(package: Path) -> Any:
    """The model spec (coremltools.proto.Model_pb2.Model) of a package."""
    import_coremltools()
    from coremltools.proto import Model_pb2

    files = PackageFiles.of(package)
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(files.spec.read_bytes())
    except (OSError, ValueError) as exc:
        raise PackageFormatError(f"{files.spec}: cannot read the model spec ({exc})") from exc
    return spec


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


@contextlib.contextmanager
def staged_package(output: Path) -> Iterator[Path]:
    """A path to write a package at, beside `output`; on success it is normalised and renamed over `output`
    (a killed writer leaves only a hidden temp folder, never a half-written package)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        package = staging / output.name
        yield package
        normalize_package(package)
        if output.exists():
            shutil.rmtree(output)
        os.replace(package, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_package(model: Any, output: Path) -> None:
    """Save a coremltools model atomically (see staged_package)."""
    with staged_package(output) as package:
        model.save(str(package))


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
