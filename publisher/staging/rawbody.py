"""A large request body read straight from the socket into reused buffers, past the ASGI receive path.

uvicorn hands an ASGI app its body 64 KiB at a time, each piece copied twice and passed through an event and a
task switch: for a 1 GiB LFS upload that path alone cost ~1.1 s of the event loop (bench/staging_transfer.py),
more than the client needs to send it. An upload handler that wants the bytes fast takes the body over instead:
the connection's transport is switched to a buffered protocol that reads the rest of the body (exactly the
announced Content-Length, never a byte of the next request) into a few reused buffers (2 to 8 a body, within one
budget for all), handed to the handler as they fill; a slow sender holds no thread, only its buffers. When the body
is done the HTTP protocol gets the connection back with a fresh parser, so keep-alive goes on; a body cut short
ends the connection with the answer.

The HTTP side (`server.DeadlineProtocol`) offers a `RawBody` in the request's scope, under `EXTENSION`; the
handler calls `chunks()` before it reads the body any other way.
"""

from __future__ import annotations

import asyncio
import collections
import mmap
import socket
from collections.abc import AsyncGenerator
from typing import Any, Protocol

EXTENSION = "publisher.raw_body"
BUFFER_SIZE = 4 * 1024 * 1024
# A body starts with two buffers (one filling, one with the handler's disk write and hash) and takes another,
# up to BUFFERS_MAX, whenever the reader would otherwise stop for want of one, while all bodies together hold fewer
# than BUFFER_BUDGET. The disk is the slowest stage (~0.8 s a GiB here, about what the client needs to send it) and
# its latency varies: 8 buffers rather than 4 kept it busy and took ~0.07 s off a 1 GiB part upload's sending phase
# (10 of 12 paired rounds faster); the budget keeps eight uploads at once to the 128 MiB that 4 each took before.
BUFFERS_START = 2
BUFFERS_MAX = 8
BUFFER_BUDGET = 32
MIN_BODY = 1024 * 1024  # smaller bodies go the ordinary way
# The socket wakes its reader only once this much has queued (SO_RCVLOWAT; less for a body's last bytes): the
# reader woke ~3,600 times a GiB for ~300 KB each, and every wake-up opened the window to the sender one sliver at a
# time. Fewer, larger reads took 0.11-0.14 s (11-14%) off a 1 GiB part upload's sending phase (paired rounds).
RECEIVE_LOWAT = 2 * 1024 * 1024
MAX_ACTIVE = BUFFER_BUDGET // BUFFERS_START  # bodies read raw at once; past it one goes the ordinary way
POOLED = BUFFERS_MAX  # buffers kept for the next bodies: fresh ones cost page faults and zeroing, ~10% of an upload's CPU
_pool: list[mmap.mmap] = []  # one event loop: no lock
_active = 0
_held = 0  # buffers held by the bodies being read, and by their handlers


def _take_buffer() -> mmap.mmap:
    # anonymous maps are page-aligned, so a handler may write them with O_DIRECT
    return _pool.pop() if _pool else mmap.mmap(-1, BUFFER_SIZE)


def _return_buffer(buffer: mmap.mmap) -> None:
    if len(_pool) < POOLED:
        _pool.append(buffer)


class BodyClosed(Exception):
    """The connection ended before the whole body arrived."""


class HttpSide(Protocol):
    """What a RawBody needs of the HTTP protocol it borrows the connection from."""

    transport: Any

    def raw_body_taken(self, cycle: Any) -> tuple[bytes, bool]:
        """Hand over the body bytes of `cycle` (the request's) already parsed, and stop reading unless the body is
        complete: (bytes, whether the body is complete)."""

    def raw_body_returned(self, cycle: Any, keep_alive: bool) -> None:
        """Take the connection back after the body (a fresh parser; close after the answer unless keep_alive)."""

    def raw_connection_lost(self, exc: Exception | None) -> None:
        """The connection ended while the body was being read."""


class RawBody:
    """One request's body, read raw. `length` is the announced Content-Length; `cycle` the HTTP side's request
    (opaque here); `parsed` counts the body bytes its parser has already taken (in the request's ordinary buffer)."""

    def __init__(self, http: HttpSide, cycle: Any, length: int) -> None:
        self.http = http
        self.cycle = cycle
        self.length = length
        self.parsed = 0
        self.taken = False
        self._remaining = 0
        self._free: collections.deque[mmap.mmap] = collections.deque()
        self._filled: collections.deque[memoryview] = collections.deque()
        self._current: mmap.mmap | None = None
        self._owned = 0
        self._fill = 0
        self._reading = False
        self._closed: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._socket: Any = None  # the connection's, for its low-water mark (None: one that does not take it)
        self._lowat = 1

    async def chunks(self) -> AsyncGenerator[memoryview, None]:
        """The body in order, as views of page-aligned buffers of BUFFER_SIZE bytes each (the last one shorter; a
        body that had all arrived with its headers comes as one view of its own). A buffer is reused once
        `release(view)` is called for its view: call it when the bytes have been written and hashed. Raises
        BodyClosed if the connection ends early."""
        if self.taken:
            raise RuntimeError("the body was already taken")
        self.taken = True
        prefix, complete = self.http.raw_body_taken(self.cycle)
        if complete or len(prefix) >= BUFFER_SIZE:
            if prefix:
                yield memoryview(prefix)
            if complete:
                self._done = True
                return
            prefix = b""
        global _active
        _active += 1  # until the reading below ends, whichever way
        self._remaining = self.length - self.parsed
        for _ in range(BUFFERS_START):
            self._take()
        self._current = self._free.popleft()
        self._current[:len(prefix)] = prefix  # the bytes parsed before: every buffer then starts aligned
        self._fill = len(prefix)
        transport = self.http.transport
        transport.set_protocol(_BodyReader(self))
        self._socket = transport.get_extra_info("socket")
        self._set_lowat(min(RECEIVE_LOWAT, self._remaining))
        self._resume()
        try:
            while True:
                while not self._filled:
                    if self._closed is not None:
                        raise BodyClosed("The connection closed before the whole body arrived") from self._closed
                    if self._remaining == 0:
                        return
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                yield self._filled.popleft()
        finally:
            _active -= 1
            self._finish()

    @staticmethod
    def room() -> bool:
        """Whether one more body may be read raw now (the buffers of all of them are bounded)."""
        return _active < MAX_ACTIVE

    @property
    def read_to_end(self) -> bool:
        """The whole body was taken and read (the connection can go on after the answer)."""
        return self.taken and self._done and self._remaining == 0 and self._closed is None

    def release(self, view: memoryview) -> None:
        """The bytes of `view` are used: its buffer takes the next bytes."""
        buffer = view.obj
        view.release()
        if not isinstance(buffer, mmap.mmap):
            return  # the bytes parsed before the body was taken
        if self._done:
            self._give(buffer)
            return
        self._free.append(buffer)
        if self._current is None and self._remaining:
            self._current, self._fill = self._free.popleft(), 0
            self._resume()

    def _take(self) -> None:
        global _held
        self._free.append(_take_buffer())
        self._owned += 1
        _held += 1

    def _give(self, buffer: mmap.mmap) -> None:
        global _held
        _return_buffer(buffer)
        self._owned -= 1
        _held -= 1

    # -- the reader's side -----------------------------------------------------------------------------------

    def _buffer(self) -> memoryview:
        assert self._current is not None
        end = min(BUFFER_SIZE, self._fill + self._remaining)
        return memoryview(self._current)[self._fill:end]

    def _set_lowat(self, lowat: int) -> None:
        """Wake the reader once `lowat` bytes have queued. It never exceeds what the body has left: a Linux socket
        also wakes when its buffer is full or the peer closes, so the reader cannot wait for bytes that never come."""
        if self._socket is None or lowat == self._lowat:
            return
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            self._lowat = lowat
        except (OSError, AttributeError):  # a socket that does not take it is read as it comes
            self._socket = None

    def _received(self, count: int) -> None:
        self._fill += count
        self._remaining -= count
        if 0 < self._remaining < self._lowat:
            self._set_lowat(self._remaining)
        if self._fill == BUFFER_SIZE or self._remaining == 0:
            assert self._current is not None
            self._filled.append(memoryview(self._current)[:self._fill])
            if not self._free and self._remaining and self._owned < BUFFERS_MAX and _held < BUFFER_BUDGET:
                self._take()  # rather than stop reading while the handler's workers catch up
            self._current = self._free.popleft() if self._free and self._remaining else None
            self._fill = 0
            if self._remaining == 0:
                self._pause()
                self._give_back(keep_alive=True)  # before the handler answers: the next request is the HTTP side's
            elif self._current is None:
                self._pause()  # every buffer is in use: the handler's workers are behind
            self._wake()

    def _lost(self, exc: BaseException | None) -> None:
        self._closed = exc or ConnectionResetError("connection closed")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause(self) -> None:
        if self._reading:
            self._reading = False
            self.http.transport.pause_reading()

    def _resume(self) -> None:
        if not self._reading and self._closed is None and self._remaining:
            self._reading = True
            self.http.transport.resume_reading()

    def _give_back(self, keep_alive: bool) -> None:
        if not self._done:
            self._done = True
            self._pause()
            self._set_lowat(1)  # the next request's headers are read as they come
            if self._closed is None:
                self.http.transport.set_protocol(self.http)
            self.http.raw_body_returned(self.cycle, keep_alive)

    def _finish(self) -> None:
        """The handler stopped reading: a body not read to its end ends the connection with the answer."""
        self._give_back(keep_alive=False)
        for buffer in self._free:
            self._give(buffer)
        self._free.clear()
        if self._current is not None:
            self._give(self._current)
            self._current = None


class _BodyReader(asyncio.BufferedProtocol):
    """The transport's protocol while a RawBody reads: bytes go into its buffers, nothing is parsed."""

    def __init__(self, body: RawBody) -> None:
        self.body = body

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.body._buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.body._received(nbytes)

    def eof_received(self) -> bool | None:
        self.body._lost(None)
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.body._lost(exc)
        self.body.http.raw_connection_lost(exc)
