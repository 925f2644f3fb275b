"""The staging Hub's file reads: tree pages, paths-info, resolve (downloads with Range)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from publisher.staging.http import (
    MAX_JSON_BODY,
    TREE_PAGE,
    TREE_PAGE_EXPANDED,
    HubBase,
    _body,
    _flag,
    _url_type,
    header_safe,
)
from publisher.staging.storage import (
    FileEntry,
    Repo,
    StoreError,
    check_path,
)

MAX_PATHS_INFO = 1000  # paths per paths-info request
LISTINGS_KEPT = 4  # tree listings kept for their next pages
DOWNLOAD_BLOCK = 4 * 1024 * 1024  # bytes of a file read (by a worker thread) and sent at a time


class FilesApi(HubBase):
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

    def _tree_items(self, found: Repo, commit: str, path: str, recursive: bool, expand: bool) -> list[dict[str, Any]]:
        """A tree listing's entries (a big tree is work: run in a thread, off the event loop). A commit never
        changes, so a listing is kept for the pages that follow (the last few, by their commit and options)."""
        key = (found.pk, commit, path, recursive, expand)
        with self._listings_lock:
            if key in self._listings:
                self._listings.move_to_end(key)
                return self._listings[key]
        files = self.store.files(commit, path) if path else self.store.files(commit)
        if path and not any(f.path.startswith(path + "/") for f in files):
            raise StoreError(404, f"Entry not found: {path}", "EntryNotFound")
        items = self._entries(found, commit, files, path, recursive, expand)
        with self._listings_lock:
            self._listings[key] = items
            while len(self._listings) > LISTINGS_KEPT:
                self._listings.popitem(last=False)
        return items

    async def tree(self, request: Request, t: str, repo: str, rev: str, path: str = "") -> Response:
        found = self._repo(request, t, repo)
        commit = self.store.resolve(found, rev)
        path = path.strip("/")
        if path:
            check_path(path)
        recursive = _flag(request.query_params.get("recursive"))
        expand = _flag(request.query_params.get("expand"))
        items = await asyncio.to_thread(self._tree_items, found, commit, path, recursive, expand)
        limit = TREE_PAGE_EXPANDED if expand else TREE_PAGE
        try:
            limit = max(1, min(limit, int(request.query_params.get("limit", limit))))
            start = int(request.query_params.get("cursor", "0"))
        except ValueError as exc:
            raise StoreError(400, "cursor and limit must be integers") from exc
        if start < 0:  # a slice from the end would serve the last entries
            raise StoreError(400, "cursor must not be negative")
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
        if len(paths) > MAX_PATHS_INFO:
            raise StoreError(400, f"{len(paths)} paths; paths-info answers {MAX_PATHS_INFO} at most per request")
        expand = _flag((form.get("expand") or [""])[0])
        return JSONResponse(await asyncio.to_thread(self._paths_info, found, commit, paths, expand))

    def _paths_info(self, found: Repo, commit: str, paths: list[str], expand: bool) -> list[dict[str, Any]]:
        """Each path's entry: files by a dict, folders by the set of every file's parent folders (no scan of the
        tree per path)."""
        files = self.store.files(commit)
        by_path = {f.path: f for f in files}
        folders = {f.path[:i] for f in files for i in range(len(f.path)) if f.path[i] == "/"}
        items = []
        for path in dict.fromkeys(p.strip("/") for p in paths):
            if path in by_path:
                items.append(self._file_item(by_path[path], expand))
            elif path in folders:
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                under = [f for f in files if f.path.startswith(path + "/")]
                items.extend(i for i in self._entries(found, commit, under, parent, False, expand) if i["path"] == path)
        return items

    # -- uploads ------------------------------------------------------------------------------------------

    async def resolve(self, request: Request, repo: str, rev: str, path: str, prefix: str = "") -> Response:
        found = self._repo(request, _url_type(prefix), repo)
        if found.gated and not self._authenticated(request):  # the one user of this Hub is on every gate's list
            raise StoreError(401, f"Access to {found.type} {found.id} is restricted. You must have access to it and be "
                                  "authenticated to access it. Please log in.", "GatedRepo")
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





async def _file_chunks(path: Any, start: int, length: int, sent: Callable[[int], None]) -> AsyncIterator[bytes]:
    """A file's bytes in blocks read by a worker thread, the next block read while this one is sent: a blob that
    is not in the page cache (uploads are written past it) would otherwise stall the event loop on the disk."""
    loop = asyncio.get_running_loop()
    with open(path, "rb", buffering=0) as handle:
        fd = handle.fileno()
        position, remaining = start, length
        reading: asyncio.Future[bytes] | None = loop.run_in_executor(
            None, os.pread, fd, min(remaining, DOWNLOAD_BLOCK), position)
        try:
            while reading is not None:
                block = await reading
                reading = None
                if not block:
                    break
                position += len(block)
                remaining -= len(block)
                if remaining > 0:
                    reading = loop.run_in_executor(None, os.pread, fd, min(remaining, DOWNLOAD_BLOCK), position)
                sent(len(block))
                yield block
        finally:
            if reading is not None:  # the file closes next: no read may still be running on it
                await asyncio.wait([reading])
