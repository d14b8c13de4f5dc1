"""The console copy: what goes into the log ring, also written to odyn's own stdout.

Under plain `docker run` of the enclave image nobody reads the log ring (vsock 17001), so without
this copy the app's output is invisible; in a debug-mode enclave odyn's stdout is the console
`nitro-cli console` shows. `--no-console` turns the copy off; the log ring is unaffected.

A stuck or slow stdout (a console nobody drains, a full pipe) must never block the app or odyn:
writes go to a bounded buffer that one thread empties with blocking writes. When the buffer is
full, new data is dropped and counted, and the next write that gets through starts with one line
saying how many bytes were lost.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque

DEFAULT_BOUND = 256 << 10  # bytes waiting for stdout before new data is dropped


class Console:
    def __init__(self, fd: int = 1, bound: int = DEFAULT_BOUND) -> None:
        if bound < 1:
            raise ValueError("the console bound must be positive")
        self.fd = fd
        self.bound = bound
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._dropped = 0
        self._closed = False
        self._broken = False  # stdout is gone (EPIPE, EBADF): drop everything quietly
        self._lock = threading.Condition()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._drain, name="odyn-console", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self._dropped

    def write(self, data: bytes) -> None:
        """Queue `data` for stdout; never blocks on stdout itself."""
        if not data:
            return
        with self._lock:
            if self._closed or self._broken:
                return
            if self._queued + len(data) > self.bound:
                self._dropped += len(data)
                return
            if self._dropped:
                marker = f"\n[odyn: {self._dropped} bytes of console output dropped: stdout is not keeping up]\n"
                self._chunks.append(marker.encode())
                self._queued += len(marker)
                self._dropped = 0
            self._chunks.append(data)
            self._queued += len(data)
            self._idle.clear()
            self._lock.notify()

    def close(self, timeout: float) -> bool:
        """Stop taking data and wait up to `timeout` seconds for what is queued to reach stdout;
        True when it all did."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        return self._idle.wait(timeout)

    def _drain(self) -> None:
        while True:
            with self._lock:
                while not self._chunks and not self._closed:
                    self._idle.set()
                    self._lock.wait()
                if not self._chunks:
                    self._idle.set()
                    return
                chunk = self._chunks.popleft()
            try:
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[os.write(self.fd, view):]
                    except BlockingIOError:  # a non-blocking stdout (shared with someone else): wait for room
                        select.select([], [self.fd], [], 1.0)
            except OSError:
                with self._lock:
                    self._broken = True
                    self._chunks.clear()
            with self._lock:
                self._queued -= len(chunk)
                if self._broken:
                    self._queued = 0
