"""The log ring: the app's output, kept in a bounded buffer for every reader, sans-IO.

Each reader gets what is still in the ring, then live data; a reader that falls more than the
ring's size behind skips ahead and is told how much it missed (the app is never blocked by a
slow reader). After `close()` (the app exited and its pipes are drained) a reader that has read
everything sees end-of-stream, which the I/O shell turns into a half-close (upstream issue:
"Send an EOF on logs socket"; the host reads it with `enclaver_rules.link.logs`).
"""

from __future__ import annotations

DEFAULT_SIZE = 128 << 10  # upstream's ring


class LogRing:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError("ring size must be positive")
        self.size = size
        self.data = bytearray()
        self.start = 0  # absolute offset of data[0]
        self.closed = False

    @property
    def end(self) -> int:
        return self.start + len(self.data)

    def append(self, chunk: bytes) -> None:
        if self.closed:
            raise ValueError("the log is closed")
        self.data += chunk
        excess = len(self.data) - self.size
        if excess > 0:
            del self.data[:excess]
            self.start += excess

    def close(self) -> None:
        self.closed = True

    def reader(self) -> int:
        """A new reader's position: the oldest byte still in the ring."""
        return self.start

    def read(self, position: int, limit: int = 1 << 16) -> tuple[bytes, int, bool]:
        """(bytes for this reader, its new position, end-of-stream reached)."""
        out = b""
        if position < self.start:
            missed = self.start - position
            out = f"\n[odyn: {missed} bytes of log dropped: this reader fell behind]\n".encode()
            position = self.start
        chunk = bytes(self.data[position - self.start: position - self.start + limit])
        position += len(chunk)
        return out + chunk, position, self.closed and position == self.end
