"""Weight file names in a diffusers/transformers component folder, and which copy a build loads.

A Hub repo often holds several copies of one component's weights (`.bin`, `.safetensors`, their `fp16`
variants, `non_ema` copies, shards with an index). Both the source fetch (which copy to download) and the loaders
(which `variant` to ask diffusers/transformers for) decide by these names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

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


def weights_variant(folder: Path) -> str | None:
    """The `variant` to load a component folder with: that of the copy a build prefers among those present (a
    fetched folder holds exactly one)."""
    names = [p.name for p in Path(folder).iterdir()] if Path(folder).is_dir() else []
    copies = _weight_copies(names)
    return next((variant for variant, ext in PREFERENCES["auto"] if (variant, ext) in copies), None)
