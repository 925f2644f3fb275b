"""A large request body read straight from the socket into reused buffers, past the ASGI receive path.

uvicorn hands an ASGI app its body 64 KiB at a time, each piece copied twice and passed through an event and a
task switch: for a 1 GiB LFS upload that path alone cost ~1.1 s of the event loop (bench/staging_transfer.py),
more than the client needs to send it. An upload handler that wants the bytes fast takes the body over instead:
the connection's transport is switched to a buffered protocol that reads the rest of the body (exactly the
announced Content-Length, never a byte of the next request) into a few fixed buffers, handed to the handler as they
fill; a slow sender holds no thread, only its buffers. When the body is done the HTTP protocol gets the connection
back with a fresh parser, so keep-alive goes on; a body cut short ends the connection with the answer.

The HTTP side (`server.DeadlineProtocol`) offers a `RawBody` in the request's scope, under `EXTENSION`; the
handler calls `chunks()` before it reads the body any other way.
"""

from __future__ import annotations

import asyncio
import collections
import mmap
from collections.abc import AsyncGenerator
from typing import Any, Protocol

EXTENSION = "publisher.raw_body"
BUFFER_SIZE = 4 * 1024 * 1024
BUFFERS = 4  # per body: one filling, the others hashed and written by the handler's workers
MIN_BODY = 1024 * 1024  # smaller bodies go the ordinary way
MAX_ACTIVE = 32  # bodies read raw at once (16 MiB of buffers each at most); past it one goes the ordinary way
POOLED = 8  # buffers kept for the next bodies: fresh ones cost page faults and zeroing, ~10% of an upload's CPU
_pool: list[mmap.mmap] = []  # one event loop: no lock
_active = 0


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
        self._fill = 0
        self._reading = False
        self._closed: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._done = False

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
        self._free.extend(_take_buffer() for _ in range(BUFFERS))
        self._current = self._free.popleft()
        self._current[:len(prefix)] = prefix  # the bytes parsed before: every buffer then starts aligned
        self._fill = len(prefix)
        transport = self.http.transport
        transport.set_protocol(_BodyReader(self))
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
            _return_buffer(buffer)
            return
        self._free.append(buffer)
        if self._current is None and self._remaining:
            self._current, self._fill = self._free.popleft(), 0
            self._resume()

    # -- the reader's side -----------------------------------------------------------------------------------

    def _buffer(self) -> memoryview:
        assert self._current is not None
        end = min(BUFFER_SIZE, self._fill + self._remaining)
        return memoryview(self._current)[self._fill:end]

    def _received(self, count: int) -> None:
        self._fill += count
        self._remaining -= count
        if self._fill == BUFFER_SIZE or self._remaining == 0:
            assert self._current is not None
            self._filled.append(memoryview(self._current)[:self._fill])
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
            if self._closed is None:
                self.http.transport.set_protocol(self.http)
            self.http.raw_body_returned(self.cycle, keep_alive)

    def _finish(self) -> None:
        """The handler stopped reading: a body not read to its end ends the connection with the answer."""
        self._give_back(keep_alive=False)
        for buffer in self._free:
            _return_buffer(buffer)
        self._free.clear()
        if self._current is not None:
            _return_buffer(self._current)
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
