"""Where the EIF's bytes go: the file and the CRC32, each in its own worker thread.

`write_eif` produces the EIF chunk by chunk; this takes each chunk to a writer thread and a CRC
thread (pipeline.py says why threads), and for a real file starts the disk's writeback as it goes
(writeback.py), so reading, hashing, CRC and writing overlap instead of adding up.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import BinaryIO

from enclaver_rules.eif.pipeline import Worker
from enclaver_rules.eif.writeback import Writeback


class Output:
    """Writes chunks to `out` in order and keeps their CRC32 (starting from `crc`)."""

    def __init__(self, out: BinaryIO, crc: int = 0) -> None:
        self._out = out
        self.crc = crc
        self.written = 0
        self._writeback: Writeback | None = None
        with contextlib.suppress(OSError, AttributeError):  # an in-memory file (UnsupportedOperation): no sync
            self._writeback = Writeback(out.fileno())
        self._writer = Worker("eif-write", self._write)
        self._crc = Worker("eif-crc32", self._checksum)

    def _write(self, chunk: bytes) -> None:
        self._out.write(chunk)
        if self._writeback is not None:
            self._writeback.wrote(len(chunk))

    def _checksum(self, chunk: bytes) -> None:
        self.crc = zlib.crc32(chunk, self.crc)

    def write(self, chunk: bytes, *, crc: bool = True) -> None:
        """Queue `chunk` (not to be changed afterwards); `crc=False` for bytes the CRC skips."""
        self.written += len(chunk)
        self._writer.put(chunk)
        if crc:
            self._crc.put(chunk)

    def close(self) -> None:
        """Wait for every chunk to be written and CRC'd; raises what a worker hit (a full disk)."""
        try:
            self._writer.close()
            self._crc.close()
        finally:
            if self._writeback is not None:
                self._writeback.close()

    def abandon(self) -> None:
        """Stop the workers after the caller failed; their own errors no longer matter."""
        with contextlib.suppress(Exception):
            self.close()
