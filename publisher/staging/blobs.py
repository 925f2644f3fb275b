"""The staging Hub's blob files: content-addressed by sha256, written to a temp file and renamed into place only once
their bytes are on disk (and, for uploads, verified), so a blob path that exists always holds the right bytes."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from publisher.staging.errors import StoreError

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class BlobFiles:
    """The blob folder and the upload temp folder of a store (a mixin of HubStore)."""

    blobs: Path
    tmp: Path

    def blob_path(self, sha256: str) -> Path:
        if not _SHA256_RE.fullmatch(sha256):
            raise StoreError(400, f"Invalid sha256 '{sha256}'")
        return self.blobs / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int) -> bool:
        try:
            return self.blob_path(sha256).stat().st_size == size
        except FileNotFoundError:
            return False

    def new_temp(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        return fd, Path(name)

    def adopt_temp(self, temp: Path, sha256: str) -> None:
        """Move a fully written, verified temp file into the blob store (fsync first: never lose a commit's data)."""
        target = self.blob_path(sha256)
        target.parent.mkdir(exist_ok=True)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)

    def put_bytes(self, data: bytes) -> str:
        return self.put_many([data])[0]

    def put_many(self, blobs: list[bytes]) -> list[str]:
        """Store small blobs with one flush to disk for all of them (a commit of thousands of regular files would
        otherwise wait for as many fsyncs), each renamed into place only after the flush."""
        ids = [hashlib.sha256(data).hexdigest() for data in blobs]
        written: dict[str, Path] = {}
        try:
            for sha256, data in zip(ids, blobs, strict=True):
                if sha256 in written or self.has_blob(sha256, len(data)):
                    continue
                fd, temp = self.new_temp()
                written[sha256] = temp
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
            if written:
                _flush_to_disk(self.tmp, list(written.values()))
                for sha256, temp in written.items():
                    target = self.blob_path(sha256)
                    target.parent.mkdir(exist_ok=True)
                    os.replace(temp, target)
        finally:
            for temp in written.values():
                temp.unlink(missing_ok=True)
        return ids

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def touch_blob(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.blob_path(sha256))

    def clean_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove upload temp files left by aborted uploads."""
        removed = 0
        cutoff = time.time() - older_than_s
        for temp in self.tmp.iterdir():
            try:
                if temp.stat().st_mtime < cutoff:
                    if temp.is_dir():
                        shutil.rmtree(temp, ignore_errors=True)
                    else:
                        temp.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


def _flush_to_disk(folder: Path, files: list[Path]) -> None:
    """Make the files' bytes durable: one syncfs(2) of the folder's filesystem where the C library has it, else an
    fsync per file."""
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is not None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in files:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
