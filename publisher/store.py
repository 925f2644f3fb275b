"""The build store: content-addressed step outputs, written atomically, checked by sha256 before reuse.

A step's key is the hash of its kind, its parameters, its inputs' keys and the tool versions. Its output is
built in a temp folder and renamed into `objects/<key>` together with `record.json` (the sha256 and size of every
file, its inode/size/mtime stamp, and how long the build took). A lookup trusts an output whose files all keep
their stamps (the no-op rebuild of a full-size manifest reads nothing); any other is re-hashed, and one whose files
no longer hash to the record is thrown away and built again. `verify=True` re-hashes everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from publisher.util.atomic import atomic_write_text
from publisher.util.codehash import code_digest
from publisher.util.hashing import sha256_file, step_key
from publisher.util.versions import library_versions

__all__ = ["BuildStore", "StoredOutput", "sha256_file", "stamp_of", "step_key", "tool_versions", "tree_files"]

RECORD = "record.json"


Stamp = tuple[int, int, int]  # (inode, size, mtime in ns): a file unchanged since it was hashed keeps all three


def stamp_of(stat_result: os.stat_result) -> Stamp:
    return (stat_result.st_ino, stat_result.st_size, stat_result.st_mtime_ns)


def tree_files(root: Path, known: Mapping[Stamp, str] | None = None) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, size) for every file under root (record.json excluded), sorted. A file whose
    stamp is in `known` (hashed before and unchanged since) is not read again."""
    files = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if rel == RECORD:
            continue
        info = path.stat()
        digest = known.get(stamp_of(info)) if known else None
        files[rel] = (digest or sha256_file(path), info.st_size)
    return files


def tool_versions() -> dict[str, str]:
    """What build-info records: the project's version, the libraries' and a digest of the code every stored step
    kind runs (each step's key has its own kind's), so that `publisher status` sees a code change."""
    import publisher
    from publisher.compress.scheme import schemes
    from publisher.plan import STEP_CODE

    modules = {m for kind in STEP_CODE.values() for m in kind} | {type(s).__module__ for s in schemes().values()}
    return {"coreml-publisher": publisher.__version__, **library_versions(), "code": code_digest(tuple(sorted(modules)))}


@dataclass(frozen=True)
class StoredOutput:
    key: str
    path: Path
    record: dict[str, Any]

    @property
    def seconds(self) -> float:
        return float(self.record.get("seconds", 0.0))

    def vouched(self) -> dict[Stamp, str]:
        """stamp -> sha256 of this output's files as the record holds them (for hard links of them elsewhere)."""
        return {tuple(entry["stamp"]): entry["sha256"] for entry in self.record.get("files", {}).values()
                if "stamp" in entry}


class BuildStore:
    """`verify=True` re-hashes every stored output on lookup; otherwise an output whose files all keep the inode,
    size and mtime recorded when they were hashed is trusted, and only a changed one is hashed again."""

    def __init__(self, root: Path, verify: bool = False) -> None:
        self.root = Path(root)
        self.verify = verify
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.objects / key[:2] / key

    def clean_temp(self) -> None:
        """Remove what killed builds left half-written (never visible under objects/)."""
        for leftover in self.tmp.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    def get(self, key: str) -> StoredOutput | None:
        """The stored output of `key` if it exists and every file hashes to its record; a corrupt one is removed."""
        folder = self.path(key)
        record_path = folder / RECORD
        if not record_path.exists():
            return None
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = None
        if not isinstance(record, dict) or not self._intact(folder, record):
            self._discard(folder)
            return None
        return StoredOutput(key=key, path=folder, record=record)

    def _intact(self, folder: Path, record: dict[str, Any]) -> bool:
        """The same files as recorded, each with its recorded sha256. A file whose stamp is unchanged since it
        was hashed is trusted (unless `verify`); the others are hashed, and their new stamps recorded when the
        bytes still match, so the next lookup is free again."""
        try:
            entries = record["files"]
            present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {RECORD}
            if present != set(entries):
                return False
            restamped = False
            for name, entry in entries.items():
                info = (folder / name).stat()
                if not self.verify and entry.get("stamp") == list(stamp_of(info)):
                    continue
                if info.st_size != entry["size"] or sha256_file(folder / name) != entry["sha256"]:
                    return False
                if entry.get("stamp") != list(stamp_of(info)):
                    entry["stamp"] = list(stamp_of(info))
                    restamped = True
        except (OSError, KeyError, TypeError, AttributeError):
            return False
        if restamped:
            atomic_write_text(folder / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
        return True

    def _discard(self, folder: Path) -> None:
        trash = Path(tempfile.mkdtemp(prefix="discard-", dir=self.tmp))
        with contextlib.suppress(FileNotFoundError):
            os.replace(folder, trash / "x")
        shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def building(self, key: str, info: Mapping[str, Any]) -> Iterator[Path]:
        """Yield an empty temp folder; when the block ends without error, record and publish it as `key`."""
        work = Path(tempfile.mkdtemp(prefix=f"{key[:12]}-", dir=self.tmp))
        start = time.perf_counter()
        try:
            yield work
            files = tree_files(work)
            # stamps taken now survive the rename into objects/ (same inodes, same mtimes)
            record = {**info, "key": key, "seconds": round(time.perf_counter() - start, 2),
                      "files": {name: {"sha256": sha, "size": size, "stamp": list(stamp_of((work / name).stat()))}
                                for name, (sha, size) in files.items()}}
            atomic_write_text(work / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
            target = self.path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                self._discard(target)
            os.replace(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
