"""sha256 of upload bodies as they arrive: a session's running hash, and the lane that feeds it in order."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class SerialLane:
    """Jobs run one after another, in the order submitted, in a worker thread of the lane's own: the next job starts
    as soon as the last one ends, with no round trip through the event loop between them (that round trip left the
    hash idle while the loop was busy reading). The thread ends whenever the lane runs dry, so an abandoned upload
    keeps none."""

    def __init__(self, name: str = "lane") -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0
        self._tail: asyncio.Future[None] | None = None

    def submit(self, job: Callable[[], None]) -> asyncio.Future[None]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        future.add_done_callback(self._job_done)
        self._tail = future
        return future

    def _job_done(self, _: asyncio.Future[None]) -> None:
        self._pending -= 1
        if not self._pending and self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def drained(self) -> None:
        if self._tail is not None:
            await asyncio.wait([self._tail])


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
