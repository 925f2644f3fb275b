"""The staging Hub's writes of files: preupload and commits (NDJSON)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from publisher.staging.cards import validate_card
from publisher.staging.http import (
    PREFIXES,
    USER,
    HubBase,
    _flag,
    _json,
    _lines,
)
from publisher.staging.patterns import is_ignored
from publisher.staging.storage import (
    LFS_SIZE_THRESHOLD,
    Repo,
    StoreError,
    check_path,
)
from publisher.util.hashing import git_blob_id

PARSE_BATCH_CHARS = 8 * 1024 * 1024  # NDJSON characters parsed per worker-thread call
PARSE_BATCH_LINES = 512
MAX_IGNORE_WORK = 20_000_000  # gitIgnore characters x path characters per preupload (a real one: ~100 x 10_000)


class CommitsApi(HubBase):
    async def preupload(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request)
        create_pr = _flag(request.query_params.get("create_pr"))
        commit = self.store.resolve(found, "main" if create_pr and rev == "main" else rev)
        files = body.get("files")
        if not isinstance(files, list) or len(files) > 256:
            raise StoreError(400, "'files' must be a list of at most 256 entries")
        gitignore = body.get("gitIgnore")
        gitignore = gitignore if isinstance(gitignore, str) else self.store.gitignore(commit)
        # matching is linear in pattern x path: the request's whole matching work is bounded before it is done
        pattern_chars = sum(len(line) for line in gitignore.splitlines() if line.strip())
        path_chars = sum(len(str(item.get("path", ""))) for item in files if isinstance(item, dict))
        if pattern_chars * path_chars > MAX_IGNORE_WORK:
            raise StoreError(400, f"gitIgnore of {pattern_chars} characters against {path_chars} characters of paths "
                             f"is more matching than one preupload does ({MAX_IGNORE_WORK})")
        answers = await asyncio.to_thread(self._upload_modes, found, commit, files, gitignore)
        return JSONResponse({"files": answers, "commitOid": commit})

    def _upload_modes(self, found: Repo, commit: str, files: list[Any], gitignore: str) -> list[dict[str, Any]]:
        """Each file's upload mode, the stored object it would replace, and whether it is ignored (a listing of the
        commit and pattern matching: run in a worker thread)."""
        current = {f.path: f for f in self.store.files(commit)}
        answers = []
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("size"), int) or isinstance(item["size"], bool) \
                    or item["size"] < 0:
                raise StoreError(400, "each file needs 'path' and a non-negative integer 'size'")
            path = check_path(str(item.get("path", "")))
            mode = self.store.upload_mode(found, commit, path, item["size"])
            remote = current.get(path)
            oid = None
            if remote is not None:
                oid = remote.sha256 if mode == "lfs" else remote.git_oid
                if remote.lfs != (mode == "lfs"):
                    oid = None  # storage kind changes: the file must be sent again
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": is_ignored(gitignore, path), "oid": oid})
        return answers

    async def commit(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        create_pr = _flag(request.query_params.get("create_pr"))
        parsed = _Parsed()
        batch: list[tuple[int, str]] = []
        batch_chars = 0
        number = 0
        async for line in _lines(request):
            self._count("commit", len(line) + 1)
            number += 1
            if line.strip():
                batch.append((number, line))
                batch_chars += len(line)
            if batch_chars > PARSE_BATCH_CHARS or len(batch) >= PARSE_BATCH_LINES:
                # decoding, hashing and writing a commit's regular files is CPU and disk work: a batch at a time
                # in a worker thread (memory stays bounded by a batch, and other clients are served meanwhile)
                await asyncio.to_thread(self._parse_lines, batch, parsed)
                batch, batch_chars = [], 0
        if batch:
            await asyncio.to_thread(self._parse_lines, batch, parsed)
        header, operations = parsed.header, parsed.operations
        if header is None or not str(header.get("summary", "")).strip():
            raise StoreError(400, "The commit needs a header with a summary")
        parent = header.get("parentCommit")
        if parent is not None and not (isinstance(parent, str) and re.fullmatch(r"[0-9a-f]{40}", parent)):
            raise StoreError(400, "parentCommit must be a full commit id (40 hex characters)")
        # a commit of thousands of files is disk and database work: off the event loop, so others are served
        oid, pr = await asyncio.to_thread(self.store.commit, found, rev, operations, str(header["summary"]),
                                          str(header.get("description", "")), header.get("parentCommit"), create_pr,
                                          USER)
        base = f"{self._base(request)}/{PREFIXES[found.type]}{found.id}"
        return JSONResponse({"success": True, "commitOid": oid, "commitUrl": f"{base}/commit/{oid}",
                             "commitMessage": header["summary"],
                             "pullRequestUrl": f"{base}/discussions/{pr}" if pr else None})

    def _parse_lines(self, lines: list[tuple[int, str]], parsed: _Parsed) -> None:
        """A commit's NDJSON lines (numbered) into its header and operations; regular files are stored as blobs
        (the batch's together: one flush to disk)."""
        regular: list[tuple[dict[str, Any], bytes]] = []
        for number, line in lines:
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if not isinstance(value, dict):
                    raise TypeError("value must be an object")
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(400, f"Malformed NDJSON at line {number}: {exc}") from exc
            if key == "header":
                parsed.header = value
            elif key == "file":
                path, data = _regular_file(number, value)
                operation = {"path": path, "_size": len(data), "_git_oid": git_blob_id(data)}
                regular.append((operation, data))
                parsed.operations.append((key, operation))
            elif key in ("lfsFile", "deletedFile", "deletedFolder"):
                parsed.operations.append((key, value))
            else:
                raise StoreError(400, f"line {number}: unknown key '{key}'")
        for (operation, _), sha256 in zip(regular, self.store.put_many([data for _, data in regular]), strict=True):
            operation["_sha256"] = sha256


@dataclass
class _Parsed:
    """What a commit's NDJSON said so far."""

    header: dict[str, Any] | None = None
    operations: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _regular_file(number: int, value: dict[str, Any]) -> tuple[str, bytes]:
    """A `file` line's path and bytes, checked as the Hub checks them."""
    if value.get("encoding", "base64") != "base64":
        raise StoreError(400, f"line {number}: only base64 encoding is accepted")
    if not isinstance(value.get("content", ""), str) or not isinstance(value.get("path"), str):
        raise StoreError(400, f"line {number}: 'path' and 'content' must be strings")
    try:
        data = base64.b64decode(value.get("content", ""), validate=True)
    except ValueError as exc:
        raise StoreError(400, f"line {number}: content is not valid base64") from exc
    check_path(value["path"])
    if len(data) > LFS_SIZE_THRESHOLD:  # as the Hub: a regular file above 10 MB goes through LFS
        raise StoreError(422, f"line {number}: {value['path']} is {len(data)} bytes; files larger than "
                              f"{LFS_SIZE_THRESHOLD} bytes must be pushed with LFS", "FileTooLarge")
    if value["path"] == "README.md":  # as the Hub: a card whose metadata does not parse is refused
        errors, _ = validate_card(data.decode("utf-8", "replace"))
        if errors:
            raise StoreError(400, f"Invalid metadata in README.md: {'; '.join(errors)}", "InvalidMetadata")
    return str(value["path"]), data
