"""Read an EIF from its bytes as they arrive: what `describe` gives for the file, without reading it back.

A fetched EIF (the remote cache) used to be streamed to disk under its SHA-256, then read twice more
by `describe` (the CRC pass of `read_eif`, then PCR0 and PCR2), one pass after the other. A
`StreamedEif` is fed the same chunks as they are written (`update`) and does all of that on the way:
the header and section headers are checked as `read_eif` checks them, the CRC32 runs in a worker
thread, PCR0 and PCR2 in `Measurer`'s two, and the metadata and signature sections (small, bounded)
are kept; `describe()` then builds the same dictionary `describe.describe` would for these bytes, or
raises the `EifError` it would (the message names the stream, not a path). File writes, hashlib and
zlib release the GIL for large buffers, so on two cores a fetch costs about one pass of wall time.

Trust: the result is about the bytes fed, nothing else. The fetcher (`rules/remote_cache.Landing`)
writes the very chunks it feeds here, verifies their SHA-256, renames the file into place and then
says so (`landed`: the digest, the byte count, the file's stat); that is recorded only when the
count is what this object saw. A caller uses the result for a file only when `describes` says it
is that file, with that digest, unchanged since it landed (`rules/eif.check_fetched`), and reads
the file itself otherwise.

`pcrs=False` leaves out the two SHA-384 chains over the application ramdisks (PCR0 and PCR2, most
of a fetch's CPU): the description then has PCR1 (and PCR8) only, no `SignatureCheck`, and
`signature` for the caller to check against the PCR0 it is given instead (see rules/remote_cache.py).
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from typing import Any

from enclaver_rules.eif.describe import MAX_METADATA_SECTION, description
from enclaver_rules.eif.format import (
    HEADER_SIZE,
    MAGIC,
    MAX_SECTIONS,
    SECTION_CMDLINE,
    SECTION_HEADER_SIZE,
    SECTION_KERNEL,
    SECTION_METADATA,
    SECTION_NAMES,
    SECTION_RAMDISK,
    SECTION_SIGNATURE,
    EifError,
    Section,
)
from enclaver_rules.eif.measure import Measurements, Measurer
from enclaver_rules.eif.pipeline import Worker
from enclaver_rules.eif.sign import MAX_SIGNATURE_SECTION, SignatureInfo, read_signature
from enclaver_rules.oci.digest import Digest

_HEADER = struct.Struct(f">4sHHQQHH{MAX_SECTIONS}Q{MAX_SECTIONS}QII")
_SECTION = struct.Struct(">HHQ")


def file_stamp(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class _Crc:
    def __init__(self, start: int) -> None:
        self.value = start

    def update(self, chunk: bytes) -> None:
        self.value = zlib.crc32(chunk, self.value)


class StreamedEif:
    """Fed an EIF's bytes in order (`update`); `describe()` once they are all in. Never raises from
    `update`: a malformed EIF is remembered and raised by `describe()`, so the stream is still read
    to its end (its digest verified, the transfer finished) whatever it holds."""

    def __init__(self, name: str = "the streamed EIF", *, pcrs: bool = True) -> None:
        self.name = name
        self.count = 0  # bytes fed
        #: set by `landed`: the digest the fetcher verified for exactly the bytes fed, and their count
        self.digest: Digest | None = None
        self.size: int | None = None
        self.stamp: tuple[int, int, int, int, int] | None = None
        self._error: EifError | None = None
        self._pending = b""  # a header not yet complete
        self._header: tuple[Any, ...] | None = None
        self._version = self._count = 0
        self._arch = "x86_64"
        self._offsets: tuple[int, ...] = ()
        self._sizes: tuple[int, ...] = ()
        self._crc_expected = 0
        self._sections: list[Section] = []
        self._index = 0  # the section whose header or data comes next
        self._left = 0  # data bytes of the current section still to come (after its header)
        self._kind = 0
        self._kept: bytearray | None = None  # the current metadata or signature section's bytes
        self._metadata: bytes | None = None
        self._signature: bytes | None = None
        self._oversized: dict[int, Section] = {}  # the first metadata/signature section, when too big
        self._done = False  # every declared section is in: what follows is not part of the EIF
        self._measurer = Measurer(app=pcrs)
        self.signature: SignatureInfo | None = None  # set by `describe` for a signed EIF
        self._crc = _Crc(0)
        self._crc_worker: Worker[bytes] | None = None
        self._measured: Measurements | None = None
        self._position = HEADER_SIZE
        self._finished = False

    # -- feeding ------------------------------------------------------------------------------------

    def update(self, chunk: bytes) -> None:
        self.count += len(chunk)
        if self._error is not None or self._done or self._finished:
            return
        try:
            self._feed(chunk)
        except EifError as e:
            self._error = e
            self._stop_workers()

    def landed(self, digest: Digest, size: int, stat: os.stat_result) -> None:
        """The fetcher verified `digest` over the `size` bytes it fed here and kept exactly those,
        in the file whose stat is `stat` (just after it was renamed into place)."""
        if size == self.count and not self._finished:
            self.digest, self.size, self.stamp = digest, size, file_stamp(stat)

    def describes(self, digest: Digest, stat: os.stat_result) -> bool:
        """Whether this is about the file with `digest` whose stat is now `stat`: landed under that
        digest, in that file (same inode and size), unchanged since (same mtime and ctime)."""
        return self.digest is not None and self.digest == digest and self.stamp == file_stamp(stat) \
            and self.size == stat.st_size

    def _bad(self, message: str) -> EifError:
        return EifError(f"{self.name}: {message}", fix="this is not a valid EIF (built by nitro-cli or enclaver)")

    def _feed(self, chunk: bytes) -> None:
        view = chunk
        if self._header is None:
            self._pending += view
            if len(self._pending) < HEADER_SIZE:
                return
            view, self._pending = self._pending[HEADER_SIZE:], self._pending[:HEADER_SIZE]
            self._read_header(self._pending)
            self._pending = b""
        while view and not self._done:
            if self._left == 0 and self._kind == 0:  # a section header comes next
                need = SECTION_HEADER_SIZE - len(self._pending)
                self._pending += view[:need]
                view = view[need:]
                if len(self._pending) < SECTION_HEADER_SIZE:
                    return
                raw, self._pending = self._pending, b""
                self._start_section(raw)
                continue
            take = view[:self._left] if len(view) > self._left else view
            view = view[len(take):]
            self._section_data(take)

    def _read_header(self, header: bytes) -> None:
        if header[:4] != MAGIC:
            raise self._bad("no EIF header (magic '.eif')")
        fields = _HEADER.unpack(header)
        version, flags, count = fields[1], fields[2], fields[6]
        if version not in (2, 3, 4):
            raise self._bad(f"unsupported EIF version {version}")
        if not 2 <= count <= MAX_SECTIONS:
            raise self._bad(f"{count} sections")
        self._header = fields
        self._version, self._count = version, count
        self._arch = "aarch64" if flags & 1 else "x86_64"
        self._offsets = fields[7:7 + MAX_SECTIONS]
        self._sizes = fields[7 + MAX_SECTIONS:7 + 2 * MAX_SECTIONS]
        self._crc_expected = fields[-1]
        self._crc = _Crc(zlib.crc32(header[:HEADER_SIZE - 4]))
        self._crc_worker = Worker("fetch-eif-crc32", self._crc.update)

    def _start_section(self, raw: bytes) -> None:
        i = self._index
        if self._offsets[i] != self._position:
            raise self._bad(f"section {i} at {self._offsets[i]}, expected {self._position} "
                            "(sections are packed back to back)")
        kind, _, length = _SECTION.unpack(raw)
        if kind not in SECTION_NAMES:
            raise self._bad(f"section {i} has unknown type {kind}")
        if length != self._sizes[i]:
            raise self._bad(f"section {i} size {length} disagrees with the header ({self._sizes[i]}) or the file size")
        self._crc_put(raw)
        section = Section(kind, self._position, length)
        self._sections.append(section)
        self._kind, self._left = kind, length
        if kind == SECTION_RAMDISK:
            self._measurer.start_ramdisk()
        first_of_kind = kind in (SECTION_METADATA, SECTION_SIGNATURE) and \
            not any(s.kind == kind for s in self._sections[:-1])
        if first_of_kind:
            limit = MAX_METADATA_SECTION if kind == SECTION_METADATA else MAX_SIGNATURE_SECTION
            if length > limit:
                self._oversized[kind] = section
            else:
                self._kept = bytearray()
        self._position += SECTION_HEADER_SIZE + length
        if length == 0:
            self._end_section()

    def _section_data(self, data: bytes) -> None:
        self._crc_put(data)
        if self._kind in (SECTION_KERNEL, SECTION_CMDLINE):
            self._measurer.feed_boot(data)
        elif self._kind == SECTION_RAMDISK:
            self._measurer.feed_ramdisk(data)
        elif self._kept is not None:
            self._kept += data
        self._left -= len(data)
        if self._left == 0:
            self._end_section()

    def _end_section(self) -> None:
        if self._kept is not None:
            if self._kind == SECTION_METADATA:
                self._metadata = bytes(self._kept)
            else:
                self._signature = bytes(self._kept)
            self._kept = None
        self._kind = 0
        self._index += 1
        if self._index == self._count:
            self._done = True

    def _crc_put(self, data: bytes) -> None:
        assert self._crc_worker is not None
        self._crc_worker.put(data)

    # -- the result ---------------------------------------------------------------------------------

    def _stop_workers(self) -> None:
        """End the worker threads (idempotent); the hashes they hold are then final."""
        if self._measured is not None:
            return
        if self._crc_worker is not None:
            with contextlib.suppress(Exception):
                self._crc_worker.close()
        self._measured = self._measurer.result()

    def close(self) -> None:
        """Stop the threads without a result (the fetch failed); `describe` after this raises."""
        if not self._finished:
            self._finished = True
            self._stop_workers()
            self.digest = self.size = self.stamp = None

    def describe(self) -> dict[str, Any]:
        """What `describe.describe` gives for the bytes fed, or the EifError it raises."""
        if self._finished:
            raise self._bad("the stream was closed before it ended")
        self._finished = True
        self._stop_workers()
        if self._error is not None:
            raise self._error
        if self._header is None:
            raise self._bad("no EIF header (magic '.eif')")
        if not self._done:
            raise self._bad(f"ends inside section {self._index}" if self._kind else
                            f"section {self._index} header is cut off")
        if len([s for s in self._sections if s.kind == SECTION_KERNEL]) != 1:
            raise self._bad("there must be exactly one kernel section")
        signature = None
        if SECTION_SIGNATURE in self._oversized:
            raise self._too_big(self._oversized[SECTION_SIGNATURE], MAX_SIGNATURE_SECTION)
        signed = [s for s in self._sections if s.kind == SECTION_SIGNATURE]
        if signed:
            assert self._signature is not None
            signature = self.signature = read_signature(
                self._signature, f"{self.name}: the signature section at offset {signed[0].offset}")
        measurements = self._measured
        assert measurements is not None
        if signature is not None:
            measurements = Measurements(measurements.pcr0, measurements.pcr1, measurements.pcr2, signature.pcr8)
        metadata = [s for s in self._sections if s.kind == SECTION_METADATA]
        raw = None
        if metadata:
            if SECTION_METADATA in self._oversized:
                raise self._too_big(metadata[0], MAX_METADATA_SECTION)
            assert self._metadata is not None
            raw = (self._metadata, f"{self.name}: the metadata section at offset {metadata[0].offset}")
        return description(self._version, measurements, signature, self._crc.value == self._crc_expected,
                           self._arch, self._sections, raw)

    def _too_big(self, section: Section, limit: int) -> EifError:
        return EifError(f"{self.name}: the {section.name} section at offset {section.offset} is {section.size:,} "
                        f"bytes, more than the {limit:,} it may have", fix="the EIF is corrupt or malicious")
