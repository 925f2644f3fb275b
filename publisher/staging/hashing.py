"""sha256 of upload bodies as they arrive: a session's running hash, and the lane that feeds it in order."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable


class HashLane:
    """Hash jobs run in worker threads one after the other, in the order submitted, across requests: a multipart
    upload's part is answered once it is written, while its last buffers may still be hashed (the client sends the
    next part meanwhile instead of waiting; ~15 ms a part). Completion waits for the lane to drain."""

    def __init__(self) -> None:
        self._tail: asyncio.Future[None] | None = None

    def submit(self, job: Callable[[], None]) -> asyncio.Future[None]:
        previous = self._tail
        loop = asyncio.get_running_loop()

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])  # its failure is its own request's; the order is what matters here
            await loop.run_in_executor(None, job)

        self._tail = asyncio.ensure_future(run())
        return self._tail

    async def drained(self) -> None:
        if self._tail is not None:
            await asyncio.wait([self._tail])


class RunningHash:
    """sha256 of a part file's bytes as they are written, while they arrive in order (clients send parts one after
    the other): completion then needs no second pass over the file. A write that lands before the hashed end (a
    retried or repeated part) may have changed hashed bytes, and one past it leaves a gap: either makes the running
    hash unusable, and completion hashes the file."""

    def __init__(self) -> None:
        self.lane = HashLane()  # the session's parts are hashed one after the other, across their requests
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
