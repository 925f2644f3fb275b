"""The staging Hub's LFS transfers: the batch API, signed single and multipart uploads hashed as they arrive, verify."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import hmac
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from publisher.staging.http import (
    MAX_LFS_OBJECT,
    MAX_RUNNING_HASHES,
    MULTIPART_CHUNK,
    MULTIPART_THRESHOLD,
    UPLOAD_URL_TTL_S,
    HubBase,
    _drain,
    _json,
    _url_type,
)
from publisher.staging.lanes import BodyLanes, RunningHash
from publisher.staging.rawbody import EXTENSION, BodyClosed, RawBody
from publisher.staging.storage import (
    StoreError,
)
from publisher.util.hashing import sha256_file

WRITE_BATCH = 4 * 1024 * 1024  # body bytes written and hashed per worker-thread call
Sink = Callable[[int, "bytes | memoryview"], None]  # takes each written piece of a body, at its offset (a hash)


class LfsApi(HubBase):
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
        if not signature.isascii() or not hmac.compare_digest(signature, self._sign(oid, size, expires, session)):
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
            await asyncio.to_thread(self._adopt_if_intact, temp, oid, size, written, digest.hexdigest())  # fsync
        finally:
            temp.unlink(missing_ok=True)
        return Response(status_code=200)

    async def _write_body(self, request: Request, kind: str, fd: int, offset: int, limit: int,
                          sink: Sink, too_large: str, lanes: BodyLanes | None = None, flush: bool = False) -> int:
        """Write the request body at `offset` of `fd` (at most `limit` bytes), each piece passed to `sink` (a hash)
        in order. Writing and hashing run in worker threads while the next bytes arrive (both release the GIL):
        inline they were ~40% of the event loop's samples during an upload (py-spy), time other clients waited.

        Without `lanes` everything is written and sunk when this returns. With the lanes of an upload session
        (its parts) this returns once the body has arrived and its pieces are queued on them: the part is answered
        while its last writes and hashes run on, and the session's completion waits for the lanes. `flush` queues
        a flush to disk after the writes that went through the page cache, so that the completion's fsync finds
        most of the file on disk (writes with O_DIRECT need none: a flush each would only hold the write lane up)."""
        own = lanes is None
        lanes = lanes or BodyLanes()
        raw = request.scope.get("extensions", {}).get(EXTENSION)
        try:
            if isinstance(raw, RawBody) and not raw.taken and raw.room():
                if raw.length > limit:
                    raise StoreError(400, too_large)
                written, buffered = await self._write_raw_body(raw, kind, fd, offset, sink, lanes)
            else:
                written = await self._write_streamed_body(request, kind, fd, offset, limit, sink, lanes, too_large)
                buffered = True
            if flush and buffered:
                lanes.write(functools.partial(_flush, os.dup(fd)))
        finally:
            if own:  # the caller closes the file next: no write may still be running then
                await asyncio.shield(lanes.drained())
        return written

    async def _write_streamed_body(self, request: Request, kind: str, fd: int, offset: int, limit: int, sink: Sink,
                                   lanes: BodyLanes, too_large: str) -> int:
        """The body through ASGI (small ones; `Expect: 100-continue`; chunked), queued a batch of ~4 MiB at a time;
        the reading waits for a batch's write before it queues the next, so one batch at most is held."""
        written = 0
        batch: list[bytes] = []
        batch_size = 0
        last_write: asyncio.Future[None] | None = None

        def queue() -> asyncio.Future[None]:
            position = offset + written - batch_size
            lanes.hash(functools.partial(_sink_all, sink, position, batch))
            return lanes.write(functools.partial(_write_chunks, os.dup(fd), position, batch))

        async for chunk in request.stream():
            if written + len(chunk) > limit:
                raise StoreError(400, too_large)
            self._count(kind, len(chunk))
            batch.append(chunk)
            batch_size += len(chunk)
            written += len(chunk)
            if batch_size >= WRITE_BATCH:
                if last_write is not None:
                    await asyncio.wait([last_write])
                last_write = queue()
                batch, batch_size = [], 0
        if batch:
            queue()
        return written

    async def _write_raw_body(self, raw: RawBody, kind: str, fd: int, offset: int, sink: Sink,
                              lanes: BodyLanes) -> tuple[int, bool]:
        """The body read raw (rawbody.py): each buffer goes to both lanes at once while the next ones fill, and back
        to the reader when both are done with it. Each lane takes its buffers one after the other: sha256 is
        sequential, and two writes at once into one file contend for its lock (ext4: the server's CPU per GiB
        doubled, spinning). Whole aligned buffers are written with O_DIRECT where the file system takes it: no copy
        into the page cache and no writeback later (ext4: ~0.3 s of CPU per GiB, a fifth of the server's), and the
        completion's fsync finds them on disk. Returns the bytes written and whether they went through the page
        cache (no O_DIRECT here)."""
        written = 0
        direct = _direct_twin(fd)

        def release_when_done(view: memoryview, both: asyncio.Future[Any]) -> None:
            both.add_done_callback(lambda _: raw.release(view))

        try:
            async with contextlib.aclosing(raw.chunks()) as chunks:  # closed on a failure too: the connection back
                async for view in chunks:
                    self._count(kind, len(view))
                    position = offset + written
                    written += len(view)
                    write = lanes.write(functools.partial(_write_view, os.dup(fd), direct, position, view))
                    hashed = lanes.hash(functools.partial(sink, position, view))
                    release_when_done(view, asyncio.gather(write, hashed, return_exceptions=True))
                    if lanes.failure is not None:
                        raise lanes.failure  # a failed write or hash fails the upload now
        except BodyClosed as exc:
            raise StoreError(400, str(exc)) from exc
        finally:
            if direct is not None:
                lanes.write(functools.partial(os.close, direct))  # after the writes queued on it
        return written, direct is None

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
                                                 f"Part {number} is larger than {expected} bytes", running.lanes,
                                                 flush=True)
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
        if session in self._completing:  # a repeated completion (a client's retry): the answer of the first
            await asyncio.shield(self._completing[session])
            return JSONResponse({})
        if self._writing.get(session):
            raise StoreError(409, "Parts of this upload are still being written: complete it once they are done")
        if not session or not path.exists():
            raise StoreError(400, "No part was uploaded")
        running = self._hashes.get(session)
        self._seal(session)  # from here on no part of this session is written (no await since the check above)
        sealed = path.with_name(path.name + ".sealed")
        os.replace(path, sealed)
        finishing = self._completing[session] = asyncio.ensure_future(
            self._finish_multipart(sealed, oid, size, running))
        try:
            await asyncio.shield(finishing)
        finally:
            if finishing.done():
                self._completing.pop(session, None)
            else:  # this request was cancelled: the completion goes on, and is forgotten when it ends
                finishing.add_done_callback(lambda _: self._completing.pop(session, None))
        return JSONResponse({})

    async def _finish_multipart(self, sealed: Path, oid: str, size: int, running: RunningHash | None) -> None:
        """Check a sealed multipart file against its object id and adopt it, off the event loop (a file hashed
        anew, fsync). The session's running hash is used once its lane has hashed the last part."""
        if running is not None:
            await running.lanes.drained()  # the parts' last writes and hashes; a failed write fails here
        sha256 = running.sha256_of(size) if running is not None else None
        await asyncio.to_thread(self._adopt_sealed, sealed, oid, size, sha256)

    def _adopt_sealed(self, sealed: Path, oid: str, size: int, sha256: str | None) -> None:
        try:
            if sha256 is None:  # parts written out of order or twice, or the session's hash evicted: hash the file
                sha256 = sha256_file(sealed)
            self._adopt_if_intact(sealed, oid, size, sealed.stat().st_size, sha256)
        finally:
            sealed.unlink(missing_ok=True)

    def _running_hash(self, session: str) -> RunningHash:
        running = self._hashes.get(session)
        if running is None:
            running = self._hashes[session] = RunningHash()
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



def _write_chunks(fd: int, position: int, chunks: list[bytes]) -> None:
    """Write chunks from `position`, then close `fd`: a duplicate of the caller's, so that a caller that closes its
    own (a request cancelled mid-batch) can never leave this write aimed at a reused descriptor."""
    try:
        for chunk in chunks:
            _pwrite_all(fd, memoryview(chunk), position)
            position += len(chunk)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, view: memoryview, position: int) -> None:
    """Write all of `view` at `position` (a write may take less than it was given)."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], position + done)


def _sink_all(sink: Sink, position: int, chunks: list[bytes]) -> None:
    for chunk in chunks:
        sink(position, chunk)
        position += len(chunk)


DIRECT_ALIGN = 4096  # O_DIRECT wants offset, length and memory aligned to the device's block: a page covers them


def _direct_twin(fd: int) -> int | None:
    """The same file opened again with O_DIRECT, or None where that is not to be had (a file system without it,
    no /proc): the caller then writes through the page cache."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | flag)
    except OSError:
        return None


def _write_view(fd: int, direct: int | None, position: int, view: memoryview) -> None:
    """Write `view` at `position`: with O_DIRECT when `direct` is given and the write is aligned (the buffers of
    rawbody.py are), else (and for what a short direct write leaves) through `fd`, which is closed after."""
    try:
        done = 0
        if direct is not None and position % DIRECT_ALIGN == 0 and len(view) % DIRECT_ALIGN == 0:
            try:
                done = os.pwrite(direct, view, position)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: an alignment this device does not take; write it buffered
                    raise
        _pwrite_all(fd, view[done:], position + done)
    finally:
        os.close(fd)


def _flush(fd: int) -> None:
    """Write a file's dirty pages to disk (an early start: adopt_temp's fsync is the one that must succeed), then
    close `fd`, a duplicate."""
    try:
        os.fdatasync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
