"""Weight file names in a diffusers/transformers component folder, and which copy a build loads.

A Hub repo often holds several copies of one component's weights (`.bin`, `.safetensors`, their `fp16`
variants, `non_ema` copies, shards with an index). Both the source fetch (which copy to download) and the loaders
(which `variant` to ask diffusers/transformers for) decide by these names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from publisher.errors import SourceError

_WEIGHT = re.compile(
    r"^(?P<stem>diffusion_pytorch_model|model|pytorch_model)"
    r"(?:(?:\.(?P<variant>[A-Za-z0-9_]+))?\.(?P<ext>safetensors|bin)"  # one file
    r"|(?:\.(?P<svariant>[A-Za-z0-9_]+))?-\d{5}-of-\d{5}\.(?P<sext>safetensors|bin)"  # a shard
    r"|\.(?P<iext>safetensors|bin)\.index(?:\.(?P<ivariant>[A-Za-z0-9_]+))?\.json)$"  # a shard index
)
# (variant, extension) in order of preference, per `weights` setting
PREFERENCES: dict[str, tuple[tuple[str | None, str], ...]] = {
    "auto": (("fp16", "safetensors"), (None, "safetensors"), ("fp16", "bin"), (None, "bin")),
    "fp16": (("fp16", "safetensors"), ("fp16", "bin")),
    "fp32": ((None, "safetensors"), (None, "bin")),
}


def _weight_copies(names: Sequence[str]) -> dict[tuple[str | None, str], list[str]]:
    """The usable weight copies in one folder, by (variant, extension): a single file, or an index with its shards
    (an index without shards, or shards without an index, are not a usable copy)."""
    singles: dict[tuple[str | None, str], str] = {}
    indexes: dict[tuple[str | None, str], str] = {}
    shards: dict[tuple[str | None, str], list[str]] = {}
    for name in names:
        match = _WEIGHT.match(name)
        if match is None:
            continue
        if match["ext"]:
            singles[match["variant"], match["ext"]] = name
        elif match["sext"]:
            shards.setdefault((match["svariant"], match["sext"]), []).append(name)
        else:
            indexes[match["ivariant"], match["iext"]] = name
    copies = {key: [name] for key, name in singles.items()}
    for key, index in indexes.items():
        if key in shards and key not in copies:
            copies[key] = [index, *sorted(shards[key])]
    return copies


def choose_weights(folder: str, names: Sequence[str], weights: str) -> tuple[list[str], str | None]:
    """The weight files to fetch from one component folder (names relative to it), and a warning or None."""
    copies = _weight_copies(names)
    for key in PREFERENCES[weights]:
        if key in copies:
            warning = None
            if key[1] == "bin":
                warning = (f"{folder}/: loading pickled weights ({', '.join(copies[key])}); no safetensors copy "
                           + ("in fp16" if weights == "fp16" else "found"))
            return copies[key], warning
    found = ", ".join(sorted(n for files in copies.values() for n in files)) or "none"
    wanted = {"auto": "fp16 or float32", "fp16": "fp16", "fp32": "float32"}[weights]
    raise SourceError(f"{folder}/ has no {wanted} weights in diffusers' names (weight files: {found})")


def _preferred_copy(folder: Path) -> tuple[tuple[str | None, str], list[str]] | None:
    """((variant, extension), file names) of the copy a build prefers among those in a folder (a fetched folder
    holds exactly one), or None."""
    names = [p.name for p in Path(folder).iterdir()] if Path(folder).is_dir() else []
    copies = _weight_copies(names)
    return next(((key, copies[key]) for key in PREFERENCES["auto"] if key in copies), None)


def weights_variant(folder: Path) -> str | None:
    """The `variant` to load a component folder with: that of the copy a build prefers among those present."""
    chosen = _preferred_copy(folder)
    return chosen[0][0] if chosen else None


# safetensors dtype names -> numpy dtypes (bfloat16 is read as raw 16-bit words and widened through torch)
_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "BF16": "uint16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


MAX_INDEX_BYTES = 64 * 2**20


def check_safetensors(path: Path) -> None:
    """The safetensors library's own checks of a file's header (its size, every tensor's dtype, shape and offsets
    inside the file, no overlaps or gaps), made before anything is allocated from it; a one-line error else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise SourceError(f"{path}: not a valid safetensors file: {str(exc).splitlines()[0] if str(exc) else exc}"
                          ) from exc


def _safetensors_header(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(offset of the data, tensor name -> {dtype, shape, data_offsets}) of a safetensors file the library's
    checks accept."""
    import json
    import struct

    check_safetensors(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if entry.get("dtype") not in _SAFETENSORS_DTYPES:
            raise SourceError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, which no model here uses")
    return 8 + length, header


def index_shards(folder: Path, index_name: str) -> list[str]:
    """The shard files a sharded copy's index names, each a plain file name of this copy inside `folder` (the
    index comes from the source repo: a name like `../../x` or `/etc/x` is refused, never opened)."""
    import json

    path = Path(folder) / index_name
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise SourceError(f"{path}: {path.stat().st_size} bytes; an index may have {MAX_INDEX_BYTES} at most")
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read the shard index: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{path}: a shard index needs a non-empty weight_map")
    match = _WEIGHT.match(index_name)
    shards = sorted({str(name) for name in weight_map.values()})
    for name in shards:
        shard = _WEIGHT.match(name) if isinstance(name, str) else None
        if shard is None or not shard["sext"] or match is None or shard["sext"] != match["iext"] \
                or shard["svariant"] != match["ivariant"] or shard["stem"] != match["stem"]:
            raise SourceError(f"{path}: weight_map names '{name}', which is not a shard of this copy (a file "
                              f"of {Path(folder).name}/ named like {index_name.split('.')[0]}-00001-of-00002)")
        if not (Path(folder) / name).is_file():
            raise SourceError(f"{path}: weight_map names {name}, which the source does not have")
    return shards


def _chosen_safetensors(folder: Path) -> list[Path]:
    """The safetensors files of the one weight copy in a fetched folder (a single file, or an index's shards)."""
    chosen = _preferred_copy(folder)
    if chosen is None or chosen[0][1] != "safetensors":
        return []
    files = chosen[1]
    if files[0].endswith(".json"):  # an index and its shards
        return [folder / name for name in index_shards(folder, files[0])]
    return [folder / files[0]]


def load_streaming(cls: Any, folder: Path) -> Any:
    """A diffusers model built on the meta device and filled tensor by tensor from its safetensors files, each
    read with plain reads and widened to float32: the float32 weights are the only copy ever held (the library's
    loader first builds a randomly initialised float32 model, then holds the file's tensors besides it). None when
    this does not apply (not a diffusers model, no safetensors copy, names that differ from the model's: old
    checkpoint layouts the library converts), so that the caller uses the library's loader."""
    import numpy as np
    import torch

    if not (hasattr(cls, "load_config") and hasattr(cls, "from_config") and hasattr(cls, "_keep_in_fp32_modules")):
        return None
    files = _chosen_safetensors(Path(folder))
    if not files:
        return None
    headers = [(path, *_safetensors_header(path)) for path in files]
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(str(folder)))
    expected = set(model.state_dict())
    if {name for _, _, header in headers for name in header} != expected:
        return None
    for path, start, header in headers:
        with open(path, "rb") as handle:
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                begin, end = entry["data_offsets"]
                handle.seek(start + begin)
                buffer = bytearray(end - begin)
                handle.readinto(buffer)
                raw = np.frombuffer(buffer, dtype=_SAFETENSORS_DTYPES[str(entry["dtype"])])
                tensor = torch.from_numpy(raw).reshape(entry["shape"])
                if entry["dtype"] == "BF16":
                    tensor = tensor.view(torch.bfloat16)
                tensor = tensor.float() if tensor.is_floating_point() else tensor
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
                else:
                    owner._buffers[leaf] = tensor
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None  # something the file does not hold (a non-persistent buffer): the library's loader builds it
    return model.eval()
