"""The EIF file: header, sections, CRC — written in one streaming pass, read back and checked.

Layout (../shared/reference/eif.md §1–§5, checked byte for byte against AWS's EifBuilder):
a 548-byte big-endian header (magic `.eif`, version 4, arch flag, default mem/cpus, section
count, 32 section offsets and 32 data sizes, CRC32), then sections back to back, each a 12-byte
header (type, flags 0, size) and its data, in the order kernel, cmdline, metadata, ramdisks,
signature. The CRC32 (zlib's) covers the header's first 544 bytes and everything after it.

An EIF to read is hostile input: `read_eif` checks the header and every section header against
the file before anything is read, reads sections in bounded chunks (the unmeasured metadata and
signature sections whole, but only up to a size no real one comes near), and says what is wrong
with an `EifError` (exit 1, "not a valid EIF"); a path that cannot be read is an `UnreadableEif`.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from enclaver_rules.eif.measure import Measurements, Measurer
from enclaver_rules.errors import InvalidInput, OperationFailed

MAGIC = b".eif"
VERSION = 4
HEADER_SIZE = 548
SECTION_HEADER_SIZE = 12
MAX_SECTIONS = 32
DEFAULT_MEM = 1 << 30
DEFAULT_CPUS = 2
ARCH_FLAGS = {"x86_64": 0, "aarch64": 1}

SECTION_KERNEL, SECTION_CMDLINE, SECTION_RAMDISK, SECTION_SIGNATURE, SECTION_METADATA = 1, 2, 3, 4, 5
SECTION_NAMES = {SECTION_KERNEL: "kernel", SECTION_CMDLINE: "cmdline", SECTION_RAMDISK: "ramdisk",
                 SECTION_SIGNATURE: "signature", SECTION_METADATA: "metadata"}
CHUNK = 1 << 20


class EifError(OperationFailed):
    """A file that is not a valid EIF."""


class UnreadableEif(InvalidInput, OperationFailed):
    """A path that cannot be read as a file: the user's argument is wrong (the CLI exits 2), and
    for callers that build the EIF themselves, an operation that failed (they catch OperationFailed)."""


@dataclass(frozen=True, slots=True)
class SectionSource:
    kind: int
    size: int
    chunks: Callable[[], Iterator[bytes]]


def pack_header(arch: str, sizes: list[int], crc: int = 0) -> bytes:
    offsets, position = [], HEADER_SIZE
    for size in sizes:
        offsets.append(position)
        position += SECTION_HEADER_SIZE + size
    pad = [0] * (MAX_SECTIONS - len(sizes))
    return struct.pack(f">4sHHQQHH{MAX_SECTIONS}Q{MAX_SECTIONS}QII", MAGIC, VERSION, ARCH_FLAGS[arch], DEFAULT_MEM,
                       DEFAULT_CPUS, 0, len(sizes), *offsets, *pad, *sizes, *pad, 0, crc)


class EifOutput(Protocol):
    """Where `write_eif` sends the EIF's bytes: written in order, CRC'd, counted."""

    crc: int
    written: int

    def write(self, chunk: bytes, *, crc: bool = True) -> None: ...
    def close(self) -> None: ...
    def abandon(self) -> None: ...


class SerialOutput:
    """Writes and CRCs in the calling thread. The builder passes eif/output.py's threaded one
    instead; this one keeps format.py (staged alone into enclaver-run, which only reads EIFs) free
    of threads."""

    def __init__(self, out: BinaryIO, crc: int = 0) -> None:
        self._out, self.crc, self.written = out, crc, 0

    def write(self, chunk: bytes, *, crc: bool = True) -> None:
        self._out.write(chunk)
        self.written += len(chunk)
        if crc:
            self.crc = zlib.crc32(chunk, self.crc)

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


def write_eif(out: BinaryIO, arch: str, sections: list[SectionSource], *,
              progress: Callable[[int], None] | None = None,
              output: Callable[[BinaryIO, int], EifOutput] = SerialOutput) -> tuple[int, Measurements, int]:
    """Write an EIF to a seekable `out`; returns (CRC, measurements, total size). `output` makes
    what the bytes go through, from `out` and the header's CRC (eif/output.py: in worker threads)."""
    if len(sections) > MAX_SECTIONS:
        raise ValueError("too many sections")
    header = pack_header(arch, [s.size for s in sections])
    start = out.tell()
    sink = output(out, zlib.crc32(header[:HEADER_SIZE - 4]))
    measurer = Measurer()
    try:
        sink.write(header, crc=False)  # the CRC covers the header without its own last 4 bytes (above)
        for section in sections:
            sink.write(struct.pack(">HHQ", section.kind, 0, section.size))
            if section.kind == SECTION_RAMDISK:
                measurer.start_ramdisk()
            written = 0
            for chunk in section.chunks():
                written += len(chunk)
                sink.write(chunk)
                if section.kind in (SECTION_KERNEL, SECTION_CMDLINE):
                    measurer.feed_boot(chunk)
                elif section.kind == SECTION_RAMDISK:
                    measurer.feed_ramdisk(chunk)
                if progress:
                    progress(len(chunk))
            if written != section.size:
                raise ValueError(f"{SECTION_NAMES[section.kind]} section: wrote {written} bytes, "
                                 f"declared {section.size}")
        sink.close()
    except BaseException:
        sink.abandon()
        measurer.close()  # its threads would wait for bytes forever
        raise
    crc = sink.crc
    end = start + sink.written
    out.seek(start + HEADER_SIZE - 4)
    out.write(struct.pack(">I", crc))
    out.seek(end)
    return crc, measurer.result(), end - start


# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Section:
    kind: int
    offset: int  # of the section header
    size: int

    @property
    def data_offset(self) -> int:
        return self.offset + SECTION_HEADER_SIZE

    @property
    def name(self) -> str:
        return SECTION_NAMES.get(self.kind, f"type {self.kind}")


@dataclass(frozen=True, slots=True)
class EifFile:
    path: str
    version: int
    arch: str
    sections: tuple[Section, ...]
    crc: int
    crc_ok: bool

    def of(self, kind: int) -> list[Section]:
        return [s for s in self.sections if s.kind == kind]

    def read(self, section: Section, limit: int | None = None) -> bytes:
        """A section's bytes; with `limit`, an `EifError` for a larger section instead of reading it."""
        if limit is not None and section.size > limit:
            raise EifError(f"{self.path}: the {section.name} section at offset {section.offset} is {section.size:,} "
                           f"bytes, more than the {limit:,} it may have", fix="the EIF is corrupt or malicious")
        with open(self.path, "rb") as f:
            f.seek(section.data_offset)
            data = f.read(section.size)
        if len(data) != section.size:
            raise EifError(f"{self.path}: ends inside the {section.name} section", fix="the file is truncated")
        return data

    def chunks(self, section: Section) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(section.data_offset)
            left = section.size
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise EifError(f"{self.path}: ends inside the {section.name} section", fix="the file is truncated")
                left -= len(chunk)
                yield chunk


def read_eif(path: str) -> EifFile:
    """Parse and check an EIF: magic, version, section table, section headers, CRC (streamed)."""
    def bad(message: str) -> EifError:
        return EifError(f"{path}: {message}", fix="this is not a valid EIF (built by nitro-cli or enclaver)")

    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the `with` below; open errors are the user's
    except OSError as e:
        raise UnreadableEif(f"cannot read the EIF: {e.strerror or e}", file=path,
                            fix="give the path of an .eif file") from None
    with f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableEif("cannot read the EIF: not a regular file", file=path, fix="give the path of an .eif file")
        size = info.st_size
        header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[:4] != MAGIC:
            raise bad("no EIF header (magic '.eif')")
        fields = struct.unpack(f">4sHHQQHH{MAX_SECTIONS}Q{MAX_SECTIONS}QII", header)
        version, flags, count = fields[1], fields[2], fields[6]
        offsets, sizes, crc = fields[7:7 + MAX_SECTIONS], fields[7 + MAX_SECTIONS:7 + 2 * MAX_SECTIONS], fields[-1]
        if version not in (2, 3, 4):
            raise bad(f"unsupported EIF version {version}")
        if not 2 <= count <= MAX_SECTIONS:
            raise bad(f"{count} sections")
        arch = "aarch64" if flags & 1 else "x86_64"
        sections = []
        running = zlib.crc32(header[:HEADER_SIZE - 4])
        position = HEADER_SIZE
        for i in range(count):
            if offsets[i] != position:
                raise bad(f"section {i} at {offsets[i]}, expected {position} (sections are packed back to back)")
            f.seek(offsets[i])
            raw = f.read(SECTION_HEADER_SIZE)
            if len(raw) < SECTION_HEADER_SIZE:
                raise bad(f"section {i} header is cut off")
            kind, _, length = struct.unpack(">HHQ", raw)
            if kind not in SECTION_NAMES:
                raise bad(f"section {i} has unknown type {kind}")
            if length != sizes[i] or position + SECTION_HEADER_SIZE + length > size:
                raise bad(f"section {i} size {length} disagrees with the header ({sizes[i]}) or the file size")
            running = zlib.crc32(raw, running)
            left = length
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:  # the file shrank while we read it
                    raise bad(f"ends inside section {i}")
                running = zlib.crc32(chunk, running)
                left -= len(chunk)
            sections.append(Section(kind, offsets[i], length))
            position += SECTION_HEADER_SIZE + length
        if len([s for s in sections if s.kind == SECTION_KERNEL]) != 1:
            raise bad("there must be exactly one kernel section")
    return EifFile(path, version, arch, tuple(sections), crc, running == crc)
