"""The two content ids the Hub uses: sha256 (LFS objects, the build store) and git's blob SHA-1 (regular files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_CHUNK = 8 * 1024 * 1024


def json_sha256(data: object) -> str:
    """sha256 of a JSON value with sorted keys (settings on record, step ids that name settings)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def step_key(kind: str, params: object, input_keys: list[str], tools: object) -> str:
    """A build step's store key: its kind, parameters, its inputs' keys and what it runs with (code, libraries)."""
    payload = json.dumps({"kind": kind, "params": params, "inputs": input_keys, "tools": tools},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def git_blob_id(data: bytes) -> str:
    """git's object id of a blob: sha1 of `blob <size>\\0` and the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git_blob_id_of_file(path: Path) -> str:
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % Path(path).stat().st_size)
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()
