"""Where the EIF's bytes go: the file and the CRC32, each in its own worker thread.

`write_eif` produces the EIF chunk by chunk; this takes each chunk to a writer thread and a CRC
thread (pipeline.py says why threads). A file on a disk is written with O_DIRECT (direct.py: the
disk's DMA moves the bytes, not the CPU that is busy hashing); where that is not to be had, through
the page cache, starting the disk's writeback as it goes (writeback.py). Either way reading,
hashing, CRC and writing overlap instead of adding up.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import BinaryIO

from enclaver_rules.eif.direct import FileSink
from enclaver_rules.eif.pipeline import Worker


class Output:
    """Writes chunks to `out` in order and keeps their CRC32 (starting from `crc`)."""

    def __init__(self, out: BinaryIO, crc: int = 0) -> None:
        self._out = out
        self.crc = crc
        self.written = 0
        self._sink: FileSink | None = None
        with contextlib.suppress(OSError, AttributeError):  # an in-memory file (UnsupportedOperation): as it is
            self._sink = FileSink(out)
        self._closed = False
        self._writer = Worker("eif-write", self._write)
        self._crc = Worker("eif-crc32", self._checksum)

    def _write(self, chunk: bytes) -> None:
        if self._sink is not None:
            self._sink.write(chunk)
        else:
            self._out.write(chunk)

    def _checksum(self, chunk: bytes) -> None:
        self.crc = zlib.crc32(chunk, self.crc)

    def write(self, chunk: bytes, *, crc: bool = True) -> None:
        """Queue `chunk` (not to be changed afterwards); `crc=False` for bytes the CRC skips."""
        self.written += len(chunk)
        self._writer.put(chunk)
        if crc:
            self._crc.put(chunk)

    def close(self) -> None:
        """Wait for every chunk to be written and CRC'd; raises what a worker hit (a full disk).
        Once: `abandon` after a failed close has nothing left to do."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self._writer.close()
            finally:
                self._crc.close()  # ended even when the writer failed
            if self._sink is not None:
                self._sink.close()
        finally:
            if self._sink is not None:
                self._sink.release()

    def abandon(self) -> None:
        """Stop the workers after the caller failed; their own errors no longer matter."""
        with contextlib.suppress(Exception):
            self.close()
