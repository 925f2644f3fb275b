"""The published layout (../shared/docs/swift-app-contract.md): package and Resources folders, deterministic zips."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

# Every zip entry gets this time, so that the same files always give the same zip bytes.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_COPY_CHUNK = 8 * 1024 * 1024


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a stored (immutable) file into place; copy where the file system cannot link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def link_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.name != "record.json":
            link_or_copy(path, target / path.relative_to(source))


def replace_folder(staged: Path, target: Path) -> None:
    """Swap a fully assembled folder into place (the old one is removed only after the new one is complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def write_zip(resources: Path, zip_path: Path, top_folder: str) -> None:
    """Zip `resources` under one top folder: sorted entries, fixed times and modes, stored (not deflated)."""
    entries = sorted(p for p in resources.rglob("*") if p.name != "record.json")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        folder = zipfile.ZipInfo(f"{top_folder}/", date_time=ZIP_TIME)
        folder.external_attr = (0o40755 << 16) | 0x10
        archive.writestr(folder, b"")
        for path in entries:
            name = f"{top_folder}/{path.relative_to(resources).as_posix()}"
            if path.is_dir():
                info = zipfile.ZipInfo(name + "/", date_time=ZIP_TIME)
                info.external_attr = (0o40755 << 16) | 0x10
                archive.writestr(info, b"")
                continue
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = path.stat().st_size
            with open(path, "rb") as source, archive.open(info, "w", force_zip64=info.file_size > 2**31) as sink:
                shutil.copyfileobj(source, sink, _COPY_CHUNK)
