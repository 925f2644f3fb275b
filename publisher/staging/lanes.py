"""Upload bodies written and hashed as they arrive: serial worker lanes, and an upload session's running hash."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable


class SerialLane:
    """Jobs run one after another, in the order submitted, in a worker thread of the lane's own: the next job starts
    as soon as the last one ends, with no round trip through the event loop between them (that round trip left the
    hash idle while the loop was busy reading). The thread lingers a moment when the lane runs dry, for the next
    buffer or part, and then ends (one thread a burst made ~150 threads a GiB); an abandoned upload keeps none."""

    LINGER_S = 2.0

    def __init__(self, name: str = "lane") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], asyncio.Future[None]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._tail: asyncio.Future[None] | None = None

    def submit(self, job: Callable[[], None]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._jobs.put((job, future))
        with self._lock:  # a worker that saw no job before this put has let go of the lane: start another
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        self._tail = future
        return future

    def _work(self) -> None:
        while True:
            try:
                job, future = self._jobs.get(timeout=self.LINGER_S)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            try:
                job()
            except Exception as exc:  # the job's failure is its future's
                _settle(future, exc)
            else:
                _settle(future, None)

    async def drained(self) -> None:
        if self._tail is not None:
            await asyncio.wait([self._tail])


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    """Settle an event loop's future from a worker thread (unless the loop has closed meanwhile)."""
    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(None)

    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
        future.get_loop().call_soon_threadsafe(settle)


class BodyLanes:
    """The two lanes an upload's buffers go through: its writes, and its sink (a hash). A failure in either is kept
    for whoever waits for the lanes: a part answered before its bytes were on disk must still fail its completion
    if they never got there."""

    def __init__(self) -> None:
        self.writes = SerialLane("write")
        self.hashes = SerialLane("hash")
        self.failure: BaseException | None = None

    def write(self, job: Callable[[], None]) -> asyncio.Future[None]:
        return self._kept(self.writes.submit(job))

    def hash(self, job: Callable[[], None]) -> asyncio.Future[None]:
        return self._kept(self.hashes.submit(job))

    def _kept(self, future: asyncio.Future[None]) -> asyncio.Future[None]:
        future.add_done_callback(self._note)
        return future

    def _note(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None and self.failure is None:
            self.failure = future.exception()

    async def drained(self) -> None:
        """Wait for every job submitted so far; raise the first failure of any."""
        await self.writes.drained()
        await self.hashes.drained()
        if self.failure is not None:
            raise self.failure


class RunningHash:
    """sha256 of a part file's bytes as they are written, while they arrive in order (clients send parts one after
    the other): completion then needs no second pass over the file. A write that lands before the hashed end (a
    retried or repeated part) may have changed hashed bytes, and one past it leaves a gap: either makes the running
    hash unusable, and completion hashes the file."""

    def __init__(self) -> None:
        self.lanes = BodyLanes()  # the session's parts go through one pair of lanes, across their requests
        self.digest = hashlib.sha256()
        self.end = 0
        self.usable = True

    def wrote(self, offset: int, data: bytes | memoryview) -> None:
        if self.usable and offset == self.end:
            self.digest.update(data)
            self.end += len(data)
        else:
            self.usable = False

    def sha256_of(self, size: int) -> str | None:
        return self.digest.hexdigest() if self.usable and self.end == size else None
