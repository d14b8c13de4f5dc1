"""One job per thread, fed in order through a bounded queue: how the EIF writer overlaps its work.

Every byte of an EIF is written, CRC'd, and (the ramdisks) hashed twice for PCR0 and PCR2. File
writes, `zlib.crc32` and hashlib all release the GIL for large buffers, so each of those jobs runs
in its own `Worker` over the same immutable chunk, side by side, instead of one after another in
the reading thread; on a 2-core machine that is the difference between the sum of the jobs and
about half of it. The queue is bounded (`depth` chunks), so memory stays a few chunks per worker
whatever the slowest job's speed, and a failed job (a full disk) is raised in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: Chunks waiting per worker: with the 4 MiB reads of eif/rootfs.py, at most 32 MiB each, and the
#: workers share the chunks they hold.
DEPTH = 8


class Worker(Generic[T]):
    """Runs `job(chunk)` for every chunk `put`, in order, in one thread. After the job raised, the
    rest are dropped (never blocking the producer) and `put`/`close` raise that error."""

    def __init__(self, name: str, job: Callable[[T], object], depth: int = DEPTH) -> None:
        self._job = job
        self._queue: queue.Queue[T | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drained, so a producer blocked on a full queue goes on to see the error
            try:
                self._job(chunk)
            except BaseException as e:  # noqa: BLE001 - handed to the producer's thread by put/close
                self.error = e

    def put(self, chunk: T) -> None:
        """Queue a chunk, which nobody may change afterwards (the job reads it later)."""
        if self.error is not None:
            raise self.error
        self._queue.put(chunk)

    def close(self) -> None:
        """Wait until every chunk is done; raises the job's error, if it had one."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
