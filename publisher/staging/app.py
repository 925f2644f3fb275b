"""The staging Hub's HTTP API: the part of the Hub's protocol that huggingface_hub 2.x uses (LFS path, no Xet).

Routing runs on the raw (still percent-encoded) path, because revisions such as `refs%2Fpr%2F1` must stay one
segment. Every refused request still has its body drained, so a keep-alive connection survives it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import html
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from publisher.staging.cards import validate_card
from publisher.staging.storage import (
    LFS_SIZE_THRESHOLD,
    FileEntry,
    HubStore,
    Repo,
    StoreError,
    check_path,
    is_ignored,
)
from publisher.util.hashing import git_blob_id

logger = logging.getLogger("publisher.staging")
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
UPLOAD_URL_TTL_S = 3600
COLLECT_EVERY_S = 600
MULTIPART_THRESHOLD = 256 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024
# The Hub's limits, so that one request cannot make the server hold or build more than a bounded amount
MAX_RUNNING_HASHES = 10_000  # upload sessions whose bytes are hashed as they arrive
MAX_LFS_OBJECT = 50 * 10**9  # the Hub refuses larger files
MAX_JSON_BODY = 10 * 1024 * 1024
MAX_NDJSON_LINE = 24 * 1024 * 1024  # a regular file is at most 10 MB on the Hub: ~13.4 MB as base64
MAX_DRAIN = 1024 * 1024  # an error answer reads at most this much of an unread body, then closes the connection
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
TREE_PAGE = 1000
TREE_PAGE_EXPANDED = 50
USER = "staging"

Handler = Callable[..., Awaitable[Response]]


@dataclass
class Faults:
    """Test-only fault injection: fail the Nth request of a kind (`{"commit": [[2, 500]], "lfs_put": [[1, "drop"]]}`).

    Kinds: the handler names (`commit`, `preupload`, `lfs_batch`, `lfs_put`, `resolve`, ...). Actions: an HTTP
    status (429 carries Retry-After: 1), or `"drop"` to close the connection after reading part of the body.
    """

    plan: dict[str, dict[int, Any]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Faults:
        raw = os.environ.get("PUBLISHER_STAGING_FAULTS", "")
        if not raw:
            return cls()
        spec = json.loads(raw)
        return cls(plan={kind: {int(n): action for n, action in items} for kind, items in spec.items()})

    def next(self, kind: str) -> Any:
        self.seen[kind] = self.seen.get(kind, 0) + 1
        return self.plan.get(kind, {}).get(self.seen[kind])


class DropConnection(Exception):
    """Injected fault: abort the response so the client sees a connection reset."""


class HubApp:
    def __init__(self, store: HubStore, token: str | None = None, faults: Faults | None = None) -> None:
        self._writing: dict[str, int] = {}  # upload session -> part writes in flight
        self._sealed: dict[str, None] = {}  # completed upload sessions, oldest first
        self._hashes: dict[str, _RunningHash] = {}  # upload session -> sha256 of its bytes written in order
        self.store = store
        self.token = token
        self.faults = faults or Faults.from_env()
        self.bytes_received: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}  # file bytes served by /resolve (what clients downloaded)
        t = r"(?P<t>models|datasets|spaces)"
        repo = r"(?P<repo>[^/]+/[^/]+?)"
        self.routes: list[tuple[str, re.Pattern[str], str]] = [
            ("POST", re.compile(r"/api/repos/create"), "create_repo"),
            ("DELETE", re.compile(r"/api/repos/delete"), "delete_repo"),
            ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
            ("GET", re.compile(r"/api/staging/stats"), "stats"),
            ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
            ("POST", re.compile(r"/api/repos/move"), "move_repo"),
            ("GET", re.compile(r"/api/(?P<t>models|datasets|spaces)"), "list_repos"),
            ("POST", re.compile(rf"/api/{t}/{repo}/super-squash/(?P<rev>[^/]+)"), "super_squash"),
            ("PUT", re.compile(rf"/api/{t}/{repo}/settings"), "settings"),
            ("POST", re.compile(rf"/api/{t}/{repo}/preupload/(?P<rev>[^/]+)"), "preupload"),
            ("POST", re.compile(rf"/api/{t}/{repo}/commit/(?P<rev>[^/]+)"), "commit"),
            ("GET", re.compile(rf"/api/{t}/{repo}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
            ("POST", re.compile(rf"/api/{t}/{repo}/paths-info/(?P<rev>[^/]+)"), "paths_info"),
            ("GET", re.compile(rf"/api/{t}/{repo}/refs"), "refs"),
            ("GET", re.compile(rf"/api/{t}/{repo}/commits/(?P<rev>[^/]+)"), "commits"),
            ("POST", re.compile(rf"/api/{t}/{repo}/branch/(?P<branch>.+)"), "create_branch"),
            ("DELETE", re.compile(rf"/api/{t}/{repo}/branch/(?P<branch>.+)"), "delete_branch"),
            ("GET", re.compile(rf"/api/{t}/{repo}/discussions"), "discussions"),
            ("POST", re.compile(rf"/api/{t}/{repo}/discussions"), "open_discussion"),
            ("GET", re.compile(rf"/api/{t}/{repo}/discussions/(?P<num>\d+)"), "discussion"),
            ("POST", re.compile(rf"/api/{t}/{repo}/tag/(?P<rev>[^/]+)"), "create_tag"),
            ("GET", re.compile(rf"/api/{t}/{repo}/revision/(?P<rev>[^/]+)"), "repo_info"),
            ("GET", re.compile(rf"/api/{t}/{repo}"), "repo_info"),
            ("POST", re.compile(r"/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch"),
             "lfs_batch"),
            ("PUT", re.compile(r"/lfs/upload/(?P<oid>[0-9a-f]{64})"), "lfs_put"),
            ("POST", re.compile(r"/lfs/upload/(?P<oid>[0-9a-f]{64})"), "lfs_complete"),
            ("PUT", re.compile(r"/lfs/part/(?P<oid>[0-9a-f]{64})/(?P<part>\d+)"), "lfs_put_part"),
            ("POST", re.compile(r"/lfs/verify/(?P<oid>[0-9a-f]{64})"), "lfs_verify"),
            ("HEAD", re.compile(r"/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
             "resolve"),
            ("GET", re.compile(r"/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
             "resolve"),
        ]
        methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]
        self.app = Starlette(routes=[Route("/{rest:path}", self.dispatch, methods=methods)], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(self._collect_forever())
        try:
            yield
        finally:
            task.cancel()

    async def _collect_forever(self) -> None:
        """Leftovers go while the server runs: killed uploads' temp files after an hour, unreferenced blobs after
        twice the life of an upload URL (a commit may still come for them until then)."""
        while True:
            await asyncio.sleep(COLLECT_EVERY_S)
            try:
                await asyncio.to_thread(self.store.clean_temp, UPLOAD_URL_TTL_S)
                await asyncio.to_thread(self.store.collect_blobs, 2 * UPLOAD_URL_TTL_S)
            except Exception:  # a failed sweep is retried at the next one
                logger.exception("cleanup sweep failed")

    # -- dispatch, errors, auth ---------------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response:
        request_id = uuid.uuid4().hex
        raw_path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1").split("?", 1)[0]
        try:
            for method, pattern, name in self.routes:
                match = pattern.fullmatch(raw_path)
                if match and method == request.method:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    action = self.faults.next(name)
                    if action is not None:
                        response = await self._inject(request, action, name)
                    else:
                        response = await getattr(self, name)(request, **args)
                    break
            else:
                raise StoreError(404, f"Not found: {request.method} {raw_path}")
        except Exception as exc:
            if not isinstance(exc, StoreError):
                logger.exception("request %s %s failed (request id %s)", request.method, raw_path, request_id)
                exc = StoreError(500, f"Internal error (request id {request_id})")
            announced = request.headers.get("content-length", "")
            big = not announced.isdigit() or len(announced) > 12 or int(announced) > MAX_DRAIN
            # a large unread body is not waited for: the answer goes out now and the connection ends with it
            drained = False if big and request.method in ("POST", "PUT", "PATCH") else await _drain(request, MAX_DRAIN)
            response = JSONResponse({"error": exc.message}, status_code=exc.status)
            if exc.code:
                response.headers["X-Error-Code"] = header_safe(exc.code)
            response.headers["X-Error-Message"] = header_safe(exc.message)[:200]
            if not drained:  # the rest of a large body is not read: the connection ends with this answer
                response.headers["Connection"] = "close"
        response.headers["X-Request-Id"] = request_id
        return response

    async def _inject(self, request: Request, action: Any, name: str) -> Response:
        if action == "drop":
            # read part of the body, then promise a response body and break off: the client sees the
            # connection drop in the middle of the exchange
            async for _chunk in request.stream():
                break

            async def broken() -> AsyncIterator[bytes]:
                yield b"{"
                raise DropConnection(f"injected connection drop on {name}")

            return StreamingResponse(broken(), headers={"Content-Length": "1000", "Connection": "close"})
        await _drain(request)
        response = JSONResponse({"error": f"injected fault on {name}"}, status_code=int(action))
        if int(action) == 429:
            response.headers["Retry-After"] = "1"
        return response

    def _count(self, kind: str, size: int) -> None:
        self.bytes_received[kind] = self.bytes_received.get(kind, 0) + size

    def _bearer(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else None

    def _authenticated(self, request: Request) -> bool:
        given = self._bearer(request)
        if self.token is None:
            return given is not None
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def _require_write(self, request: Request) -> None:
        if self.token is not None and not self._authenticated(request):
            raise StoreError(401, "Invalid credentials in Authorization header" if self._bearer(request)
                             else "A valid token is required to write to this Hub", "Unauthorized")

    def _repo(self, request: Request, t: str, repo: str, write: bool = False) -> Repo:
        repo_type = TYPES.get(t, t)
        found = self.store.get_repo(repo_type, repo)
        if write:
            self._require_write(request)
        if found is None or (found.private and not self._authenticated(request)):
            # a private repo is indistinguishable from a missing one to anyone without the token
            raise StoreError(401 if not self._authenticated(request) else 404,
                             f"Repository Not Found for url: {request.url}.", "RepoNotFound")
        return found

    def _base(self, request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # -- repos --------------------------------------------------------------------------------------------

    async def create_repo(self, request: Request) -> Response:
        self._require_write(request)
        body = await _json(request)
        name, org = body.get("name"), body.get("organization")
        if not isinstance(name, str):
            raise StoreError(400, "'name' is required")
        repo_id = f"{org}/{name}" if org else name
        if "/" not in repo_id:
            repo_id = f"{USER}/{repo_id}"
        repo_type = body.get("type") or "model"
        if repo_type not in PREFIXES:
            raise StoreError(400, f"Invalid repo type '{repo_type}'")
        repo, created = self.store.create_repo(repo_type, repo_id, _private(body), USER)
        url = f"{self._base(request)}/{PREFIXES[repo_type]}{repo.id}"
        if not created:
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        return JSONResponse({"url": url, "name": repo.id})

    async def delete_repo(self, request: Request) -> Response:
        self._require_write(request)
        body = await _json(request)
        name, org = body.get("name"), body.get("organization")
        repo_id = f"{org}/{name}" if org else str(name)
        repo_type = body.get("type") or "model"
        if repo_type not in PREFIXES:
            raise StoreError(400, f"Invalid repo type '{repo_type}'")
        repo = self._repo(request, repo_type + "s", repo_id)
        self.store.delete_repo(repo)
        return JSONResponse({})

    async def move_repo(self, request: Request) -> Response:
        self._require_write(request)
        body = await _json(request)
        source, target, repo_type = body.get("fromRepo"), body.get("toRepo"), body.get("type") or "model"
        if not isinstance(source, str) or not isinstance(target, str) or repo_type not in PREFIXES:
            raise StoreError(400, "'fromRepo' and 'toRepo' are required, 'type' must be model, dataset or space")
        self.store.move_repo(self._repo(request, repo_type + "s", source, write=True), target)
        return JSONResponse({})

    async def list_repos(self, request: Request, t: str) -> Response:
        """GET /api/models (list_models): the repos this caller may see, filtered by author and search text."""
        params = request.query_params
        author, search = params.get("author"), (params.get("search") or "").lower()
        try:
            limit = max(1, min(int(params.get("limit", "1000")), 1000))
        except ValueError as exc:
            raise StoreError(400, "'limit' must be an integer") from exc
        visible = self._authenticated(request)
        items = []
        for found in self.store.list_repos(t.removesuffix("s")):
            if (found.private and not visible) or (author and found.id.split("/")[0] != author) or \
                    (search and search not in found.id.lower()):
                continue
            head = self.store.refs(found).get("main")
            items.append({"_id": str(found.pk), "id": found.id, "modelId": found.id, "author": found.id.split("/")[0],
                          "sha": head, "private": found.private, "createdAt": found.created,
                          "lastModified": self.store.commit_info(head).get("date") if head else found.created,
                          "downloads": 0, "likes": 0, "tags": [], "gated": False, "disabled": False})
        if params.get("sort") in ("lastModified", "createdAt"):
            items.sort(key=lambda item: item[params["sort"]], reverse=params.get("direction") != "1")
        return JSONResponse(items[:limit])

    async def super_squash(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request, allow_empty=True)
        message = body.get("message") or f"Super-squash branch '{rev}'"
        if not isinstance(message, str):
            raise StoreError(400, "'message' must be a string")
        oid = self.store.super_squash(found, rev, message, USER)
        return JSONResponse({"commitId": oid})

    async def settings(self, request: Request, t: str, repo: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request)
        if "private" in body or "visibility" in body:
            self.store.set_private(found, _private(body))
        return JSONResponse({})

    async def stats(self, request: Request) -> Response:
        """Not part of the Hub's API: request and byte counts, so tests can prove that nothing was re-sent."""
        return JSONResponse({"requests": self.faults.seen, "bytes_received": self.bytes_received,
                             "bytes_sent": self.bytes_sent})

    async def whoami(self, request: Request) -> Response:
        if not self._authenticated(request):
            raise StoreError(401, "Invalid credentials in Authorization header")
        return JSONResponse({"type": "user", "name": USER, "fullname": "Staging Hub user", "orgs": [],
                             "auth": {"type": "access_token",
                                      "accessToken": {"displayName": "staging", "role": "write"}}})

    async def validate_yaml(self, request: Request) -> Response:
        body = await _json(request)
        errors, warnings = validate_card(str(body.get("content", "")))
        payload = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        if errors:
            payload["error"] = "Invalid metadata in README.md: " + "; ".join(errors)
        return JSONResponse(payload, status_code=400 if errors else 200)

    async def repo_info(self, request: Request, t: str, repo: str, rev: str = "main") -> Response:
        found = self._repo(request, t, repo)
        commit = self.store.resolve(found, rev)
        info = self.store.commit_info(commit)
        siblings = []
        for entry in self.store.files(commit):
            sibling: dict[str, Any] = {"rfilename": entry.path, "size": entry.size, "blobId": entry.git_oid}
            if entry.lfs:
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": len(entry.pointer)}
            siblings.append(sibling)
        return JSONResponse({
            "_id": str(found.pk), "id": found.id, "modelId": found.id, "author": found.id.split("/")[0],
            "sha": commit, "lastModified": info.get("date"), "createdAt": found.created, "private": found.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })

    async def refs(self, request: Request, t: str, repo: str) -> Response:
        found = self._repo(request, t, repo)
        branches, prs = [], []
        for name, oid in self.store.refs(found).items():
            if name.startswith("refs/pr/"):
                prs.append({"name": name.removeprefix("refs/pr/"), "ref": name, "targetCommit": oid})
            else:
                branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid})
        tags = [{"name": b["name"].removeprefix("refs/tags/"), "ref": b["name"], "targetCommit": b["targetCommit"]}
                for b in branches if b["name"].startswith("refs/tags/")]
        branches = [b for b in branches if not b["name"].startswith("refs/tags/")]
        payload: dict[str, Any] = {"branches": branches, "tags": tags, "converts": []}
        if request.query_params.get("include_prs"):
            payload["pullRequests"] = prs
        return JSONResponse(payload)

    async def commits(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo)
        log = self.store.history(self.store.resolve(found, rev))
        formatted = "formatted" in request.query_params.getlist("expand[]")
        return JSONResponse([{"id": c["oid"], "title": c["title"], "message": c["message"], "date": c["date"],
                              "authors": [{"user": c["author"]}],
                              **({"formatted": {"title": html.escape(c["title"]),
                                                "message": html.escape(c["message"])}} if formatted else {})}
                             for c in log])

    async def create_branch(self, request: Request, t: str, repo: str, branch: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request, allow_empty=True)
        self.store.create_branch(found, branch, body.get("startingPoint"))
        return JSONResponse({})

    async def delete_branch(self, request: Request, t: str, repo: str, branch: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        self.store.delete_branch(found, branch)
        return JSONResponse({})

    async def discussions(self, request: Request, t: str, repo: str) -> Response:
        found = self._repo(request, t, repo)
        items = [{"num": d["num"], "title": d["title"], "status": d["status"], "isPullRequest": bool(d["is_pr"]),
                  "createdAt": d["created"], "author": {"name": d["author"]}, "numComments": 0, "pinned": False,
                  "repo": {"name": found.id, "type": found.type}}
                 for d in self.store.discussions(found)]
        return JSONResponse({"discussions": items, "count": len(items), "start": 0, "numClosedDiscussions": 0})

    async def open_discussion(self, request: Request, t: str, repo: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request)
        title = body.get("title")
        if not isinstance(title, str) or not title.strip():
            raise StoreError(400, "A discussion needs a title")
        number = self.store.open_discussion(found, title.strip(), USER, pull_request=body.get("pullRequest") is True)
        return self._discussion_json(found, self.store.discussion(found, number))

    def _discussion_json(self, found: Repo, item: dict[str, Any]) -> JSONResponse:
        is_pr = bool(item["is_pr"])
        return JSONResponse({
            "num": item["num"], "title": item["title"], "status": item["status"], "isPullRequest": is_pr,
            "createdAt": item["created"], "author": {"name": item["author"]}, "events": [],
            "repo": {"name": found.id, "type": found.type}, "pinned": False, "diff": "",
            **({"changes": {"base": "refs/heads/main", "mergeCommitId": None}, "filesWithConflicts": []}
               if is_pr else {})})

    async def discussion(self, request: Request, t: str, repo: str, num: str) -> Response:
        found = self._repo(request, t, repo)
        return self._discussion_json(found, self.store.discussion(found, int(num[:9])))

    async def create_tag(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request)
        tag = body.get("tag")
        if not isinstance(tag, str):
            raise StoreError(400, "'tag' is required")
        self.store.create_tag(found, tag, rev)
        return JSONResponse({})

    # -- trees --------------------------------------------------------------------------------------------

    def _entries(self, found: Repo, commit: str, files: list[FileEntry], folder: str, recursive: bool,
                 expand: bool) -> list[dict[str, Any]]:
        """Tree entries under `folder` (files and the folders that hold them)."""
        prefix = folder.rstrip("/") + "/" if folder else ""
        children: dict[str, list[FileEntry]] = {}
        listed: list[FileEntry] = []
        for entry in files:
            if not entry.path.startswith(prefix):
                continue
            rest = entry.path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                if depth == 1 or recursive:
                    children.setdefault(prefix + "/".join(rest[:depth]), []).append(entry)
            if len(rest) == 1 or recursive:
                listed.append(entry)
        items: list[dict[str, Any]] = []
        for path, under in children.items():
            oid = hashlib.sha1("".join(f"{f.path}\0{f.git_oid}\n" for f in under).encode()).hexdigest()
            item: dict[str, Any] = {"type": "directory", "oid": oid, "size": 0, "path": path}
            if expand:
                latest = max(under, key=lambda f: self.store.commit_info(f.last_commit).get("seq", 0))
                item["lastCommit"] = self._last_commit(latest.last_commit)
            items.append(item)
        for entry in listed:
            items.append(self._file_item(entry, expand))
        return sorted(items, key=lambda i: i["path"])

    def _file_item(self, entry: FileEntry, expand: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": entry.path}
        if entry.lfs:
            item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(entry.pointer)}
        if expand:
            item["lastCommit"] = self._last_commit(entry.last_commit)
        return item

    def _last_commit(self, oid: str) -> dict[str, Any]:
        info = self.store.commit_info(oid)
        return {"id": oid, "title": info.get("title", ""), "date": info.get("date")}

    async def tree(self, request: Request, t: str, repo: str, rev: str, path: str = "") -> Response:
        found = self._repo(request, t, repo)
        commit = self.store.resolve(found, rev)
        path = path.strip("/")
        if path:
            check_path(path)
        recursive = _flag(request.query_params.get("recursive"))
        expand = _flag(request.query_params.get("expand"))
        files = self.store.files(commit, path) if path else self.store.files(commit)
        if path and not any(f.path.startswith(path + "/") for f in files):
            raise StoreError(404, f"Entry not found: {path}", "EntryNotFound")
        items = self._entries(found, commit, files, path, recursive, expand)
        limit = TREE_PAGE_EXPANDED if expand else TREE_PAGE
        try:
            limit = max(1, min(limit, int(request.query_params.get("limit", limit))))
            start = int(request.query_params.get("cursor", "0"))
        except ValueError as exc:
            raise StoreError(400, "cursor and limit must be integers") from exc
        page = items[start:start + limit]
        response = JSONResponse(page)
        if start + limit < len(items):
            params = dict(request.query_params)
            params["cursor"] = str(start + limit)
            response.headers["Link"] = f'<{request.url.replace(query=urlencode(params))}>; rel="next"'
        return response

    async def paths_info(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo)
        commit = self.store.resolve(found, rev)
        # urlencoded form (the client's `data=`), parsed here: no multipart dependency for one endpoint
        form = parse_qs((await _body(request, MAX_JSON_BODY)).decode("utf-8", "replace"), keep_blank_values=True)
        paths = form.get("paths", [])
        expand = _flag((form.get("expand") or [""])[0])
        files = self.store.files(commit)
        by_path = {f.path: f for f in files}
        items = []
        for path in paths:
            path = path.strip("/")
            if path in by_path:
                items.append(self._file_item(by_path[path], expand))
            elif path and any(f.path.startswith(path + "/") for f in files):
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                items.extend(i for i in self._entries(found, commit, files, parent, False, expand) if i["path"] == path)
        return JSONResponse(items)

    # -- uploads ------------------------------------------------------------------------------------------

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
        return JSONResponse({"files": answers, "commitOid": commit})

    def _sign(self, oid: str, size: int, expires: int, session: str = "") -> str:
        return hmac.new(self.store.secret, f"{oid}:{size}:{expires}:{session}".encode(), hashlib.sha256).hexdigest()

    def _signed_query(self, oid: str, size: int, session: str = "") -> str:
        expires = int(time.time()) + UPLOAD_URL_TTL_S
        query = {"size": size, "expires": expires, "sig": self._sign(oid, size, expires, session)}
        return urlencode({**query, "session": session} if session else query)

    def _check_signature(self, request: Request, oid: str) -> int:
        return self._check_session(request, oid)[0]

    def _check_session(self, request: Request, oid: str) -> tuple[int, str]:
        """The signed size and upload session of an upload URL (403 if it was not issued here or expired)."""
        try:
            size = int(request.query_params["size"][:20])
            expires = int(request.query_params["expires"][:20])
            signature = request.query_params["sig"]
        except (KeyError, ValueError) as exc:
            raise StoreError(403, "Upload URL is not signed") from exc
        session = request.query_params.get("session", "")
        if not re.fullmatch(r"[0-9a-f]{0,32}", session):
            raise StoreError(403, "Upload URL is not signed")
        if not hmac.compare_digest(signature, self._sign(oid, size, expires, session)):
            raise StoreError(403, "Upload URL signature does not match")
        if expires < time.time():
            raise StoreError(403, "Upload URL has expired")
        return size, session

    async def lfs_batch(self, request: Request, repo: str, prefix: str = "") -> Response:
        self._repo(request, _url_type(prefix), repo, write=True)
        body = await _json(request)
        if body.get("operation") != "upload":
            raise StoreError(400, "only the 'upload' operation is served (downloads use /resolve)")
        objects = body.get("objects")
        if not isinstance(objects, list) or len(objects) > 256:
            raise StoreError(400, "'objects' must be a list of at most 256 entries")
        base = self._base(request)
        answers = []
        for obj in objects:
            oid, size = str(obj.get("oid", "")) if isinstance(obj, dict) else "", obj.get("size") if isinstance(
                obj, dict) else None
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or isinstance(size, bool) \
                    or size < 0:
                answers.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid or size"}})
                continue
            if size > MAX_LFS_OBJECT:
                answers.append({"oid": oid, "size": size, "error": {
                    "code": 422, "message": f"object of {size} bytes exceeds the {MAX_LFS_OBJECT} bytes limit"}})
                continue
            if self.store.has_blob(oid, size):
                self.store.touch_blob(oid)  # young again: the sweep leaves it for the commit that follows
                answers.append({"oid": oid, "size": size})  # already stored: no actions, nothing is sent
                continue
            query = self._signed_query(oid, size)
            upload: dict[str, Any] = {"href": f"{base}/lfs/upload/{oid}?{query}"}
            if size > MULTIPART_THRESHOLD:
                # one session per upload: two clients sending the same object never share a part file
                session_query = self._signed_query(oid, size, secrets.token_hex(16))
                parts = math.ceil(size / MULTIPART_CHUNK)
                upload = {"href": f"{base}/lfs/upload/{oid}?{session_query}", "header": {
                    "chunk_size": str(MULTIPART_CHUNK),
                    **{str(n): f"{base}/lfs/part/{oid}/{n}?{session_query}" for n in range(1, parts + 1)}}}
            answers.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": upload, "verify": {"href": f"{base}/lfs/verify/{oid}?{query}"}}})
        return JSONResponse({"transfer": "basic", "objects": answers, "hash_algo": "sha256"},
                            media_type="application/vnd.git-lfs+json")

    async def lfs_put(self, request: Request, oid: str) -> Response:
        size = self._check_signature(request, oid)
        if self.store.has_blob(oid, size):
            await _drain(request)
            return Response(status_code=200)
        fd, temp = self.store.new_temp()
        digest = hashlib.sha256()
        try:
            try:
                written = await self._write_body(request, "lfs_put", fd, 0, size, lambda _, data: digest.update(data),
                                                 f"Body is larger than the announced {size} bytes")
            finally:
                os.close(fd)
            self._adopt_if_intact(temp, oid, size, written, digest.hexdigest())
        finally:
            temp.unlink(missing_ok=True)
        return Response(status_code=200)

    async def _write_body(self, request: Request, kind: str, fd: int, offset: int, limit: int,
                          sink: Callable[[int, bytes], None], too_large: str) -> int:
        """Write the request body at `offset` of `fd` (at most `limit` bytes), each chunk passed to `sink` (a hash)
        as it is written. Inline: hashing in a worker thread was measured no faster here (the client's sending is
        the bound once the server runs on uvloop and httptools)."""
        written = 0
        async for chunk in request.stream():
            if written + len(chunk) > limit:
                raise StoreError(400, too_large)
            self._count(kind, len(chunk))
            view = memoryview(chunk)
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, view[done:], offset + written + done)
            sink(offset + written, chunk)
            written += len(chunk)
        return written

    def _adopt_if_intact(self, temp: Path, oid: str, size: int, written: int, sha256: str) -> None:
        """Move an uploaded file into the blob store if it has the announced size and hash; else refuse it."""
        if written != size or sha256 != oid:
            raise StoreError(400, f"Uploaded content does not match: got {written} bytes with sha256 {sha256}, "
                                  f"expected {size} bytes with sha256 {oid}")
        self.store.adopt_temp(temp, oid)

    def _session_file(self, oid: str, session: str) -> Path:
        return self.store.tmp / f"multipart-{oid}-{session}"

    async def lfs_put_part(self, request: Request, oid: str, part: str) -> Response:
        size, session = self._check_session(request, oid)
        if not session:
            raise StoreError(400, "Part uploads need the session their upload URL was issued with")
        if session in self._sealed:
            raise StoreError(409, "This upload was completed: no part can be written any more")
        number = int(part[:9])
        offset = (number - 1) * MULTIPART_CHUNK
        expected = min(MULTIPART_CHUNK, size - offset)
        if number < 1 or expected <= 0:
            raise StoreError(400, f"Part {number} is out of range")
        # parts of one session go into one file of that session; completion seals the session first (no part write
        # in flight, none accepted after), so no writer can reach the blob the file becomes
        self._writing[session] = self._writing.get(session, 0) + 1
        running = self._running_hash(session)
        try:
            fd = os.open(self._session_file(oid, session), os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                written = await self._write_body(request, "lfs_put_part", fd, offset, expected, running.wrote,
                                                 f"Part {number} is larger than {expected} bytes")
                if written == expected:
                    _flush_in_background(fd)  # the completion's fsync then finds most of the file on disk
            finally:
                os.close(fd)
        finally:
            self._writing[session] -= 1
            if not self._writing[session]:
                del self._writing[session]
        if written != expected:
            raise StoreError(400, f"Part {number} has {written} bytes, expected {expected}")
        # S3 answers a part's md5; the client only echoes the ETag back at completion, so a cheap unique one will do
        return Response(status_code=200, headers={"ETag": f'"{session[:16]}-{number}-{written}"'})

    async def lfs_complete(self, request: Request, oid: str) -> Response:
        size, session = self._check_session(request, oid)
        body = await _json(request)
        parts = body.get("parts")
        if body.get("oid") != oid or not isinstance(parts, list) or len(parts) != math.ceil(size / MULTIPART_CHUNK):
            raise StoreError(400, "Completion must name the object and every part")
        path = self._session_file(oid, session)
        if self.store.has_blob(oid, size):  # another session finished first: this one is done too
            self._seal(session)
            path.unlink(missing_ok=True)
            return JSONResponse({})
        if self._writing.get(session):
            raise StoreError(409, "Parts of this upload are still being written: complete it once they are done")
        if not session or not path.exists():
            raise StoreError(400, "No part was uploaded")
        running = self._hashes.get(session)
        self._seal(session)  # from here on no part of this session is written (no await since the check above)
        sealed = path.with_name(path.name + ".sealed")
        os.replace(path, sealed)
        try:
            sha256 = running.sha256_of(size) if running is not None else None
            if sha256 is None:  # parts written out of order or twice: hash the file itself
                digest = hashlib.sha256()
                with open(sealed, "rb") as handle:
                    while block := handle.read(8 * 1024 * 1024):
                        digest.update(block)
                sha256 = digest.hexdigest()
            self._adopt_if_intact(sealed, oid, size, sealed.stat().st_size, sha256)
        finally:
            sealed.unlink(missing_ok=True)
        return JSONResponse({})

    def _running_hash(self, session: str) -> _RunningHash:
        running = self._hashes.get(session)
        if running is None:
            running = self._hashes[session] = _RunningHash()
            while len(self._hashes) > MAX_RUNNING_HASHES:  # bounded: an evicted session is hashed from its file
                self._hashes.pop(next(iter(self._hashes)))
        return running

    def _seal(self, session: str) -> None:
        self._sealed[session] = None
        self._hashes.pop(session, None)
        while len(self._sealed) > 100_000:  # bounded: the oldest seals go (their URLs expired long ago)
            self._sealed.pop(next(iter(self._sealed)))

    async def lfs_verify(self, request: Request, oid: str) -> Response:
        size = self._check_signature(request, oid)
        await _drain(request)
        if not self.store.has_blob(oid, size):
            raise StoreError(404, f"LFS object {oid} is not stored", "EntryNotFound")
        return JSONResponse({"oid": oid, "size": size})

    async def commit(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        create_pr = _flag(request.query_params.get("create_pr"))
        header: dict[str, Any] | None = None
        operations: list[tuple[str, dict[str, Any]]] = []
        number = 0
        async for line in _lines(request):
            self._count("commit", len(line) + 1)
            number += 1
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if not isinstance(value, dict):
                    raise TypeError("value must be an object")
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(400, f"Malformed NDJSON at line {number}: {exc}") from exc
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise StoreError(400, f"line {number}: only base64 encoding is accepted")
                try:
                    data = base64.b64decode(value.get("content", ""), validate=True)
                except ValueError as exc:
                    raise StoreError(400, f"line {number}: content is not valid base64") from exc
                check_path(str(value.get("path", "")))
                if len(data) > LFS_SIZE_THRESHOLD:  # as the Hub: a regular file above 10 MB goes through LFS
                    raise StoreError(422, f"line {number}: {value['path']} is {len(data)} bytes; files larger than "
                                          f"{LFS_SIZE_THRESHOLD} bytes must be pushed with LFS", "FileTooLarge")
                if value["path"] == "README.md":  # as the Hub: a card whose metadata does not parse is refused
                    errors, _ = validate_card(data.decode("utf-8", "replace"))
                    if errors:
                        raise StoreError(400, f"Invalid metadata in README.md: {'; '.join(errors)}",
                                         "InvalidMetadata")
                value = {"path": value["path"], "_sha256": self.store.put_bytes(data), "_size": len(data),
                         "_git_oid": git_blob_id(data)}
                operations.append((key, value))
            elif key in ("lfsFile", "deletedFile", "deletedFolder"):
                operations.append((key, value))
            else:
                raise StoreError(400, f"line {number}: unknown key '{key}'")
        if header is None or not str(header.get("summary", "")).strip():
            raise StoreError(400, "The commit needs a header with a summary")
        parent = header.get("parentCommit")
        if parent is not None and not (isinstance(parent, str) and re.fullmatch(r"[0-9a-f]{40}", parent)):
            raise StoreError(400, "parentCommit must be a full commit id (40 hex characters)")
        oid, pr = self.store.commit(found, rev, operations, str(header["summary"]), str(header.get("description", "")),
                                    header.get("parentCommit"), create_pr, USER)
        base = f"{self._base(request)}/{PREFIXES[found.type]}{found.id}"
        return JSONResponse({"success": True, "commitOid": oid, "commitUrl": f"{base}/commit/{oid}",
                             "commitMessage": header["summary"],
                             "pullRequestUrl": f"{base}/discussions/{pr}" if pr else None})

    # -- downloads ----------------------------------------------------------------------------------------

    async def resolve(self, request: Request, repo: str, rev: str, path: str, prefix: str = "") -> Response:
        found = self._repo(request, _url_type(prefix), repo)
        commit = self.store.resolve(found, rev)
        path = check_path(path)
        entry = self.store.file(commit, path)
        if entry is None:
            error = StoreError(404, f"Entry not found: {path}", "EntryNotFound")
            response = JSONResponse({"error": error.message}, status_code=404,
                                    headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                                             "X-Error-Message": header_safe(error.message)[:200]})
            return response
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "ETag": f'"{entry.git_oid}"',
                   "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size),
                            "ETag": f'"{entry.sha256}"'})
        start, end = 0, entry.size - 1
        status = 200
        range_header = request.headers.get("range")
        if range_header and entry.size > 0:
            match = re.fullmatch(r"bytes=(\d{0,19})-(\d{0,19})", range_header.strip())
            if not match or (not match.group(1) and not match.group(2)):
                raise StoreError(416, f"Invalid range {range_header}")
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), entry.size - 1) if match.group(2) else entry.size - 1
            else:
                start = max(0, entry.size - int(match.group(2)))
            if start >= entry.size or start > end:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{entry.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        blob = self.store.blob_path(entry.sha256)
        return StreamingResponse(_file_chunks(blob, start, length, self._sent), status_code=status, headers=headers)

    def _sent(self, size: int) -> None:
        self.bytes_sent["resolve"] = self.bytes_sent.get("resolve", 0) + size


def _flush_in_background(fd: int) -> None:
    """Start writing a file's dirty pages to disk in a worker thread (on a duplicate descriptor) and return: the
    syscall releases the GIL, so the disk works while the next part arrives."""
    duplicate = os.dup(fd)

    def flush() -> None:
        try:
            os.fdatasync(duplicate)
        except OSError:
            pass  # only an early start: adopt_temp's fsync is the one that must succeed
        finally:
            os.close(duplicate)

    threading.Thread(target=flush, name="part-flush", daemon=True).start()


class _RunningHash:
    """sha256 of a part file's bytes as they are written, while they arrive in order (clients send parts one after
    the other): completion then needs no second pass over the file. A write that lands before the hashed end (a
    retried or repeated part) may have changed hashed bytes, and one past it leaves a gap: either makes the running
    hash unusable, and completion hashes the file."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.end = 0
        self.usable = True

    def wrote(self, offset: int, data: bytes) -> None:
        if self.usable and offset == self.end:
            self.digest.update(data)
            self.end += len(data)
        else:
            self.usable = False

    def sha256_of(self, size: int) -> str | None:
        return self.digest.hexdigest() if self.usable and self.end == size else None


async def _file_chunks(path: Any, start: int, length: int, sent: Callable[[int], None]) -> AsyncIterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = length
        while remaining > 0:
            block = handle.read(min(remaining, 1024 * 1024))
            if not block:
                break
            remaining -= len(block)
            sent(len(block))
            yield block


def header_safe(text: str) -> str:
    """Header values are Latin-1 without control characters: CR, LF or NUL would break the response, and other
    text would fail to encode. Everything else is escaped, readable."""
    text = _HEADER_UNSAFE.sub(" ", text)
    return text.encode("latin-1", "backslashreplace").decode("latin-1")


async def _drain(request: Request, limit: int | None = None) -> bool:
    """Read what is left of the body (at most `limit` bytes); True when it was all read."""
    read = 0
    try:
        async for chunk in request.stream():
            read += len(chunk)
            if limit is not None and read > limit:
                return False
    except Exception:  # already consumed or disconnected: nothing left to drain
        pass
    return True


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (announced or sent) without reading the rest."""
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and len(announced) < 20 and int(announced) > limit:
        raise StoreError(413, f"Body of {announced} bytes is larger than the {limit} bytes accepted here")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise StoreError(413, f"Body is larger than the {limit} bytes accepted here")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json(request: Request, allow_empty: bool = False) -> dict[str, Any]:
    raw = await _body(request, MAX_JSON_BODY)
    if not raw and allow_empty:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise StoreError(400, f"Body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError(400, "Body must be a JSON object")
    return value


async def _lines(request: Request, max_line: int = MAX_NDJSON_LINE) -> AsyncIterator[str]:
    buffer = bytearray()
    async for chunk in request.stream():
        searched = len(buffer)
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", max(start, searched))) != -1:
            yield _decode_line(buffer[start:end])
            start = end + 1
        del buffer[:start]
        if len(buffer) > max_line:
            raise StoreError(413, "NDJSON line too long")
    if buffer:
        yield _decode_line(buffer)


def _decode_line(line: bytearray) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(400, "NDJSON is not UTF-8") from exc


def _private(body: dict[str, Any]) -> bool:
    """huggingface_hub 2.x sends `visibility`; older clients sent `private`."""
    if "visibility" in body:
        return body["visibility"] in ("private", "protected")
    return bool(body.get("private", False))


def _url_type(prefix: str) -> str:
    """`datasets/` -> `datasets`; no prefix (a model repo) -> `models`."""
    return prefix.rstrip("/") or "models"


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def create_app(root: Any, token: str | None = None, faults: Faults | None = None) -> Starlette:
    from pathlib import Path

    hub = HubApp(HubStore(Path(root)), token=token, faults=faults)
    return hub.app

