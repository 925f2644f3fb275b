"""A compressed package at another image size, from the one compressed at the default size: weights once.

A float16 conversion's weight file does not depend on the image size (measured: the UNet's and the VAE's are the same
bytes at 256x256 and 256x384), only its program's shapes do; the ControlledUnet's is the UNet's. So such a package's
compressed form is its own float16 program with every weight operation as the other's compressed package has it
(matched by the weight's place in the identical float16 weight files, renamed to this program's name: the LUT ops
that replaced its consts, the consts it kept) and that package's weight file, byte for byte: no compression is run
again and the Hub stores the weight file once. Where the two float16 packages do not hold the same weights, or an
operation has no counterpart, nothing is written and the caller compresses the package itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from publisher.mlpackage import PackageFiles
from publisher.util.hashing import sha256_file


def _weight_file(package: Path) -> Path:
    from publisher.milfile import WEIGHT_FILE_NAME

    return PackageFiles.of(package).weights / WEIGHT_FILE_NAME


def _rename(op: Any, name: str, output: str) -> None:
    """An operation under another program's names: its `name` attribute (where it has one) and its output."""
    op.outputs[0].name = output
    if "name" in op.attributes:
        op.attributes["name"].immediateValue.tensor.strings.values[:] = [name]


def _blob_offset(op: Any) -> int | None:
    """Where an operation's value lies in the weight file (None: not in the weight file)."""
    from publisher.milfile import blob_values

    return next((int(value.blobFileValue.offset) for value in blob_values(op)), None)


def rebase_compressed(base_float: Path, base_compressed: Path, other_float: Path, output: Path) -> str | None:
    """Write `output` as described in the module doc; returns None when written, else why it could not be."""
    from publisher.milfile import (
        main_block,
        op_name,
        read_spec,
        set_specification_version,
        walk_operations,
        write_package,
    )

    if sha256_file(_weight_file(base_float)) != sha256_file(_weight_file(other_float)):
        return "its float16 weights differ from the default size's"
    compressed_spec = read_spec(base_compressed)
    stored: dict[str, Any] = {}
    for op in walk_operations(main_block(compressed_spec, base_compressed)):
        if op.type.startswith("constexpr_") or _blob_offset(op) is not None:
            stored[op_name(op)] = op
    # the weight files are the same bytes: a blob's offset names one weight in both float16 packages, whatever
    # the operation is called in each program
    base_spec = read_spec(base_float)
    name_at = {offset: op_name(op) for op in walk_operations(main_block(base_spec, base_float))
               if (offset := _blob_offset(op)) is not None}
    spec = read_spec(other_float)
    if compressed_spec.specificationVersion > spec.specificationVersion:
        set_specification_version(spec, compressed_spec.specificationVersion)
    used = set()
    for op in walk_operations(main_block(spec, other_float)):
        offset = _blob_offset(op)
        if offset is None:
            continue
        name, var = op_name(op), op.outputs[0].name
        counterpart = stored.get(name_at.get(offset, ""))
        if counterpart is None:
            return f"its weight {name} has no counterpart in the compressed package"
        op.CopyFrom(counterpart)
        _rename(op, name, var)  # consumers here read it under this program's names
        used.add(name_at[offset])
    if used != set(stored):
        return f"it has {len(used)} of the compressed package's {len(stored)} weights"
    # the description stays this package's own (the ControlledUnet's is not the UNet's): compression leaves it alone
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".bin", dir=output.parent)
    os.close(handle)
    weights = Path(name)
    try:
        shutil.copyfile(_weight_file(base_compressed), weights)
        write_package(other_float, spec, weights, output)
    finally:
        weights.unlink(missing_ok=True)
    return None
