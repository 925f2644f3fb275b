"""LFS bodies read raw (staging/rawbody.py): the connection is lent out for the body and comes back after it.

What must hold whatever the path: the next request on the connection is read from its first byte (nothing of it
is swallowed as body, nothing of the body is parsed as a request), a body cut short leaves nothing behind, a slow
sender holds no worker thread, and what lands is byte for byte what was sent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from huggingface_hub import HfApi

from publisher.staging.api_lfs import DIRECT_ALIGN, _direct_twin, _write_view
from publisher.staging.process import StagingHub

DEADLOCK_GUARD_S = 120  # only reached when the server never gets there: the failure being tested


def _connect(hub: StagingHub) -> socket.socket:
    url = urlparse(hub.url)
    return socket.create_connection((url.hostname, url.port), timeout=60)


def _upload_href(hub: StagingHub, sock: socket.socket, repo_id: str, data: bytes) -> str:
    """The signed single-PUT URL (path and query) the LFS batch gives for `data`, asked on `sock`."""
    body = json.dumps({"operation": "upload", "transfers": ["basic"],
                       "objects": [{"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}]}).encode()
    sock.sendall(_head(hub, "POST", f"/{repo_id}.git/info/lfs/objects/batch", len(body)) + body)
    status, answer = _response(sock)
    assert status == 200, answer
    href = urlparse(json.loads(answer)["objects"][0]["actions"]["upload"]["href"])
    return f"{href.path}?{href.query}"


def _head(hub: StagingHub, method: str, path: str, length: int | None = None, close: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: staging", f"Authorization: Bearer {hub.token}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """One response read off the socket exactly (status line, headers, Content-Length body): what follows it stays
    unread for the next call."""
    head = b""
    while b"\r\n\r\n" not in head:
        byte = sock.recv(1)
        assert byte, f"connection closed inside a response head: {head!r}"
        head += byte
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed inside a response body"
        body += chunk
    return status, body


def _blob(hub: StagingHub, data: bytes) -> Path:
    oid = hashlib.sha256(data).hexdigest()
    return hub.root / "blobs" / oid[:2] / oid


def test_pipelined_request_after_a_raw_body_is_answered(staging_hub: StagingHub, repo_id: str) -> None:
    """A 3 MiB LFS PUT (read raw) and a GET sent behind it in the same write, then another raw PUT and a GET on the
    same connection: each is answered in order, and the stored objects are the bytes sent."""
    first, second = os.urandom(3 * 2**20 + 5), os.urandom(2 * 2**20 + 123)
    info = f"/api/models/{repo_id}"
    with _connect(staging_hub) as sock:
        for data in (first, second):
            href = _upload_href(staging_hub, sock, repo_id, data)
            sock.sendall(_head(staging_hub, "PUT", href, len(data)) + data + _head(staging_hub, "GET", info))
            status, body = _response(sock)
            assert status == 200, body
            status, body = _response(sock)
            assert status == 200 and json.loads(body)["id"] == repo_id
    for data in (first, second):
        assert _blob(staging_hub, data).read_bytes() == data


def test_raw_body_with_other_bytes_is_refused_and_the_connection_goes_on(staging_hub: StagingHub,
                                                                          repo_id: str) -> None:
    """Bytes other than the announced object: 400 'does not match', nothing stored, and the connection (whose body
    was read to its end) answers the next request."""
    data = os.urandom(2 * 2**20)
    with _connect(staging_hub) as sock:
        href = _upload_href(staging_hub, sock, repo_id, data)
        sock.sendall(_head(staging_hub, "PUT", href, len(data)) + bytes(len(data)))
        status, body = _response(sock)
        assert status == 400 and b"does not match" in body
        sock.sendall(_head(staging_hub, "GET", f"/api/models/{repo_id}"))
        assert _response(sock)[0] == 200
    assert not _blob(staging_hub, data).exists()


def test_raw_body_cut_short_leaves_nothing(staging_hub: StagingHub, repo_id: str) -> None:
    """A client that sends 3 of 8 MiB and closes: no object, and its temp file goes."""
    data = os.urandom(8 * 2**20)
    temps = staging_hub.root / "tmp"
    before = set(temps.iterdir())
    with _connect(staging_hub) as sock:
        href = _upload_href(staging_hub, sock, repo_id, data)
        sock.sendall(_head(staging_hub, "PUT", href, len(data)) + data[:3 * 2**20])
    guard = time.monotonic() + DEADLOCK_GUARD_S
    while set(temps.iterdir()) - before and time.monotonic() < guard:
        time.sleep(0.05)
    assert set(temps.iterdir()) - before == set()
    assert not _blob(staging_hub, data).exists()


def test_slow_raw_bodies_hold_no_worker_thread(hf_api: HfApi, staging_hub: StagingHub, repo_id: str) -> None:
    """Twelve uploads stopped halfway (twice the server's worker threads) while a commit, which needs a worker
    thread, is made by another client: it lands before any of them goes on; then all twelve finish and land."""
    bodies = [os.urandom(2 * 2**20) for _ in range(12)]
    socks = [_connect(staging_hub) for _ in bodies]
    try:
        for sock, data in zip(socks, bodies, strict=True):
            href = _upload_href(staging_hub, sock, repo_id, data)
            sock.sendall(_head(staging_hub, "PUT", href, len(data)) + data[:2**20 + 17])
        done: list[str] = []
        worker = threading.Thread(target=lambda: done.append(hf_api.upload_file(
            path_or_fileobj=b"meanwhile", path_in_repo="meanwhile.txt", repo_id=repo_id).oid), daemon=True)
        worker.start()
        worker.join(DEADLOCK_GUARD_S)
        assert done, "a commit waited for slow uploads"
        for sock, data in zip(socks, bodies, strict=True):
            sock.sendall(data[2**20 + 17:])
        for sock in socks:
            assert _response(sock)[0] == 200
    finally:
        for sock in socks:
            sock.close()
    for data in bodies:
        assert _blob(staging_hub, data).read_bytes() == data


def test_unmodified_client_uploads_through_the_raw_path(hf_api: HfApi, repo_id: str, tmp_path: Path) -> None:
    """huggingface_hub's own upload of a 5 MiB LFS file and a second one on its kept-alive connections: both
    downloaded back equal."""
    files = {}
    for name, size in (("a.bin", 5 * 2**20 + 1), ("b.bin", 3 * 2**20)):
        files[name] = os.urandom(size)
        hf_api.upload_file(path_or_fileobj=files[name], path_in_repo=name, repo_id=repo_id)
    for name, data in files.items():
        path = hf_api.hf_hub_download(repo_id, name, cache_dir=tmp_path)
        assert Path(path).read_bytes() == data


def test_direct_and_buffered_writes_make_one_file(tmp_path: Path) -> None:
    """An aligned page-aligned buffer written with O_DIRECT (where the file system takes it) and an unaligned tail
    through the page cache read back as the bytes written, in place."""
    target = tmp_path / "file.bin"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    direct = _direct_twin(fd)
    try:
        aligned = mmap.mmap(-1, 4 * DIRECT_ALIGN)
        aligned.write(os.urandom(4 * DIRECT_ALIGN))
        tail = os.urandom(1000)
        _write_view(os.dup(fd), direct, DIRECT_ALIGN, memoryview(aligned))
        _write_view(os.dup(fd), direct, 5 * DIRECT_ALIGN, memoryview(tail))
        _write_view(os.dup(fd), direct, 0, memoryview(b"h" * 10))  # unaligned length at an aligned offset
    finally:
        if direct is not None:
            os.close(direct)
        os.close(fd)
    data = target.read_bytes()
    assert data[:10] == b"h" * 10 and data[10:DIRECT_ALIGN] == bytes(DIRECT_ALIGN - 10)
    assert data[DIRECT_ALIGN:5 * DIRECT_ALIGN] == aligned[:] and data[5 * DIRECT_ALIGN:] == tail


class _FakeSocket:
    def __init__(self) -> None:
        self.lowat = 1

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        self.lowat = value


class _FakeTransport:
    """What a RawBody uses of an asyncio transport."""

    def __init__(self) -> None:
        self.protocol: object = None
        self.reading = False
        self.socket = _FakeSocket()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.socket if name == "socket" else default

    def set_protocol(self, protocol: object) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def feed(self, data: bytes, most: int) -> int:
        """One read of the event loop: up to `most` bytes of `data` into the reader's buffer; the count."""
        view = self.protocol.get_buffer(-1)  # type: ignore[attr-defined]
        count = min(len(view), most, len(data))
        view[:count] = data[:count]
        self.protocol.buffer_updated(count)  # type: ignore[attr-defined]
        return count


class _FakeHttp:
    """The HTTP side a RawBody borrows the connection from; `parsed` the body bytes its parser took first."""

    def __init__(self, parsed: bytes) -> None:
        self.transport = _FakeTransport()
        self.parsed = parsed
        self.returned: list[bool] = []

    def raw_body_taken(self, cycle: object) -> tuple[bytes, bool]:
        return self.parsed, False

    def raw_body_returned(self, cycle: object, keep_alive: bool) -> None:
        self.returned.append(keep_alive)

    def raw_connection_lost(self, exc: Exception | None) -> None:
        raise AssertionError("not lost")


@pytest.mark.parametrize("prefix", [0, 1000])
def test_raw_body_fills_aligned_buffers(prefix: int) -> None:
    """Bytes the HTTP parser took before the body was handed over go first into the first buffer, so that every
    buffer but the last is whole (and can be written with O_DIRECT at an aligned offset). The socket's low-water
    mark never asks for more than the body has left (the reader would wait for bytes that never come) and is back
    at 1 for the next request."""
    import asyncio

    from publisher.staging import rawbody

    data = os.urandom(rawbody.BUFFER_SIZE * 2 + 4321)
    lowats: set[int] = set()

    async def run() -> list[bytes]:
        http = _FakeHttp(data[:prefix])
        transport = http.transport
        body = rawbody.RawBody(http, None, len(data))
        body.parsed = prefix
        got: list[bytes] = []

        async def feed() -> None:  # the event loop's reads, in uneven pieces, as the transport allows
            sent = prefix
            while sent < len(data):
                await asyncio.sleep(0)
                if transport.reading:
                    assert 1 <= transport.socket.lowat <= len(data) - sent
                    lowats.add(transport.socket.lowat)
                    sent += transport.feed(data[sent:], 300_001)

        async def consume() -> None:
            async for view in body.chunks():
                got.append(bytes(view))
                body.release(view)

        await asyncio.gather(feed(), consume())  # a failed check in feed() ends the run rather than stalling it
        assert http.returned == [True]
        assert transport.socket.lowat == 1
        return got

    got = asyncio.run(run())
    assert rawbody._active == 0 and rawbody._held == 0  # counted while read and held, not after
    assert b"".join(got) == data
    assert [len(piece) for piece in got] == [rawbody.BUFFER_SIZE, rawbody.BUFFER_SIZE, 4321]
    assert rawbody.RECEIVE_LOWAT in lowats and len(lowats) > 1  # raised for the body, lowered for its tail


@pytest.mark.parametrize("held_by_others", [0, 29])
def test_a_lagging_handler_gets_more_buffers_within_the_budget(monkeypatch: pytest.MonkeyPatch,
                                                               held_by_others: int) -> None:
    """A handler that holds every buffer it was given: the body takes more rather than stop reading, up to
    BUFFERS_MAX, or fewer when the buffers of all bodies reach BUFFER_BUDGET; then reading stops until a buffer
    comes back, and every buffer is given back at the end."""
    import asyncio

    from publisher.staging import rawbody

    monkeypatch.setattr(rawbody, "_held", held_by_others)
    expected = min(rawbody.BUFFERS_MAX, max(rawbody.BUFFERS_START, rawbody.BUFFER_BUDGET - held_by_others))
    data = os.urandom(rawbody.BUFFER_SIZE * (rawbody.BUFFERS_MAX + 3))

    async def run() -> None:
        http = _FakeHttp(b"")
        transport = http.transport
        body = rawbody.RawBody(http, None, len(data))
        kept: list[memoryview] = []
        sent = 0
        chunks = body.chunks()
        while len(kept) < expected:
            reading = asyncio.ensure_future(anext(chunks))
            for _ in range(100):  # a buffer's worth of reads and the hand-over take a few turns of the loop
                await asyncio.sleep(0)
                if reading.done():
                    break
                if transport.reading:
                    sent += transport.feed(data[sent:], rawbody.BUFFER_SIZE)
            assert reading.done(), f"reading stopped after {len(kept)} buffers"
            kept.append(reading.result())
        assert not transport.reading and sent == expected * rawbody.BUFFER_SIZE  # stopped: no buffer left
        assert rawbody._held == held_by_others + expected
        body.release(kept.pop(0))  # one comes back: reading goes on into it
        assert transport.reading
        for view in kept:
            body.release(view)

        async def feed_rest() -> None:
            nonlocal sent
            while sent < len(data):
                await asyncio.sleep(0)
                if transport.reading:
                    sent += transport.feed(data[sent:], rawbody.BUFFER_SIZE)

        async def consume_rest() -> None:
            async for view in chunks:
                body.release(view)

        await asyncio.gather(feed_rest(), consume_rest())
        assert http.returned == [True]

    asyncio.run(run())
    assert rawbody._held == held_by_others and rawbody._active == 0


def test_raw_bodies_at_once_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_ACTIVE bodies read raw at once, the next one goes the ordinary way (its buffers are not taken)."""
    from publisher.staging import rawbody

    assert rawbody.RawBody.room()
    monkeypatch.setattr(rawbody, "_active", rawbody.MAX_ACTIVE)
    assert not rawbody.RawBody.room()


def test_serial_lane_runs_jobs_in_order_and_lets_its_thread_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs run in submission order on one thread, a failing one fails only its own future, and the thread ends
    once the lane has been dry for its linger time (a new job then starts another)."""
    import asyncio

    from publisher.staging.lanes import BodyLanes, SerialLane

    monkeypatch.setattr(SerialLane, "LINGER_S", 0.01)
    done: list[int] = []
    threads: set[threading.Thread] = set()  # the objects themselves: a new thread may reuse an ended one's ident

    def job(n: int) -> None:
        threads.add(threading.current_thread())
        if n == 3:
            raise OSError("disk full")
        done.append(n)

    async def run() -> None:
        lane = SerialLane("test")
        futures = [lane.submit(functools.partial(job, n)) for n in range(50)]
        await lane.drained()
        assert isinstance(futures[3].exception(), OSError)
        assert all(f.exception() is None for i, f in enumerate(futures) if i != 3)
        guard = time.monotonic() + DEADLOCK_GUARD_S
        while lane._thread is not None and time.monotonic() < guard:
            await asyncio.sleep(0.01)
        assert lane._thread is None  # dry: its thread has ended
        await lane.submit(functools.partial(job, 50))
        lanes = BodyLanes()  # a pair of lanes keeps the first failure for whoever waits for them
        lanes.write(functools.partial(job, 3))
        with pytest.raises(OSError, match="disk full"):
            await lanes.drained()

    asyncio.run(run())
    assert done == [n for n in range(51) if n != 3]
    assert len(threads) == 3  # one for the 50 jobs, one after the lane went dry, one for the pair's write lane
