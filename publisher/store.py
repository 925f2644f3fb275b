"""The build store: content-addressed step outputs, written atomically, checked by sha256 before reuse.

A step's key is the hash of its kind, its parameters, its inputs' keys and the tool versions. Its output is
built in a temp folder and renamed into `objects/<key>` together with `record.json` (the sha256 and size of every
file, and how long the build took). A record whose files no longer hash to what it says is thrown away and the
step is built again: a stored output is never reused on trust.
"""

from __future__ import annotations

import contextlib
import hashlib
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

RECORD = "record.json"
_HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def tree_files(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, size) for every file under root (record.json excluded), sorted."""
    files = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if rel == RECORD:
            continue
        files[rel] = (sha256_file(path), path.stat().st_size)
    return files


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import publisher

    versions = {"coreml-publisher": publisher.__version__}
    for name in ("coremltools", "torch", "diffusers", "transformers", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


def step_key(kind: str, params: Mapping[str, Any], input_keys: list[str], versions: Mapping[str, str]) -> str:
    payload = json.dumps({"kind": kind, "params": params, "inputs": input_keys, "tools": versions},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class StoredOutput:
    key: str
    path: Path
    record: dict[str, Any]

    @property
    def seconds(self) -> float:
        return float(self.record.get("seconds", 0.0))


class BuildStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
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
            expected = {name: (entry["sha256"], entry["size"]) for name, entry in record["files"].items()}
        except (ValueError, KeyError, TypeError):
            expected = None
            record = {}
        if expected is None or tree_files(folder) != expected:
            self._discard(folder)
            return None
        return StoredOutput(key=key, path=folder, record=record)

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
            record = {**info, "key": key, "seconds": round(time.perf_counter() - start, 2),
                      "files": {name: {"sha256": sha, "size": size} for name, (sha, size) in files.items()}}
            atomic_write_text(work / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
            target = self.path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                self._discard(target)
            os.replace(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
