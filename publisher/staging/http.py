"""The staging Hub's HTTP layer: routing, errors, auth and body helpers shared by the API areas (api_*.py).

Routing runs on the raw (still percent-encoded) path, because revisions such as `refs%2Fpr%2F1` must stay one
segment. Every refused request still has its body drained, so a keep-alive connection survives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from publisher.staging.lanes import RunningHash
from publisher.staging.rawbody import EXTENSION, RawBody
from publisher.staging.storage import (
    HubStore,
    Repo,
    StoreError,
)

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
# what a client sends about a repo (the API or a file's URL), whatever the rest of the path
_REPO_PATH = re.compile(r"/api/(?:models|datasets|spaces)/[^/]+(?:/(?:revision|commits?|tree|refs|paths-info|preupload|"
                        r"branch|tag|discussions|settings|super-squash)(?:/.*)?)?|/[^/]+/resolve/.+")
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

class HubBase:
    """Routing (handlers named by the API area mixins), errors, auth, the shared counters."""

    def __init__(self, store: HubStore, token: str | None = None, faults: Faults | None = None) -> None:
        self._writing: dict[str, int] = {}  # upload session -> part writes in flight
        self._sealed: dict[str, None] = {}  # completed upload sessions, oldest first
        self._hashes: dict[str, RunningHash] = {}  # upload session -> sha256 of its bytes written in order
        self._completing: dict[str, asyncio.Future[None]] = {}  # upload session -> its completion, while it runs
        self.store = store
        self.token = token
        self.faults = faults or Faults.from_env()
        self.bytes_received: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}  # file bytes served by /resolve (what clients downloaded)
        # tree listings by (repo, commit, path, recursive, expand), newest last: the pages of one listing
        self._listings: OrderedDict[tuple[Any, ...], list[dict[str, Any]]] = OrderedDict()
        self._listings_lock = threading.Lock()
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
            ("DELETE", re.compile(rf"/api/{t}/{repo}/tag/(?P<tag>[^/]+)"), "delete_tag"),
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
                if _REPO_PATH.fullmatch(raw_path):  # a repo id of one segment (`gpt2`): no such repo is kept here
                    raise StoreError(404 if self._authenticated(request) else 401,
                                     f"Repository Not Found for url: {request.url}.", "RepoNotFound")
                raise StoreError(404, f"Not found: {request.method} {raw_path}")
        except Exception as exc:
            if not isinstance(exc, StoreError):
                logger.exception("request %s %s failed (request id %s)", request.method, raw_path, request_id)
                exc = StoreError(500, f"Internal error (request id {request_id})")
            announced = request.headers.get("content-length", "")
            big = not announced.isdigit() or len(announced) > 12 or int(announced) > MAX_DRAIN
            raw = request.scope.get("extensions", {}).get(EXTENSION)
            if isinstance(raw, RawBody) and raw.taken:
                drained = raw.read_to_end  # taken raw: whatever it left unread ends the connection anyway
            elif big and request.method in ("POST", "PUT", "PATCH"):
                drained = False  # a large unread body is not waited for: the answer goes out now, the connection ends
            else:
                drained = await _drain(request, MAX_DRAIN)
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
