"""The SVR4 "newc" cpio writer that linuxkit uses (its vendored github.com/surma/gocpio).

Byte for byte what nitro-cli's ramdisks contain: inode numbers from 721 upwards, device 3:1 on
every entry, nlink 2 for directories and 1 otherwise, names NUL-terminated and padded to 4 bytes
from the start of the archive, data padded to 4, a `TRAILER!!!` entry, then zeros to a multiple
of 512. Written by hand because Python has no cpio writer and GNU cpio differs in every one of
these details.

Names are written as the bytes they came from (`str`s from tar headers carry bytes that are not
UTF-8 as surrogate escapes). A field that does not fit its 8 hex digits, or a name with a NUL, is
a `ValueError` here: callers check their input first (rootfs.py says which file of which layer),
so this is the last guard against writing a corrupt archive, never the user's error message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

FIRST_INODE = 721
TRAILER = "TRAILER!!!"
MAX_FIELD = 0xFFFF_FFFF
_TYPE_BITS = {"dir": 0o040000, "file": 0o100000, "symlink": 0o120000, "chardev": 0o020000,
              "blockdev": 0o060000, "fifo": 0o010000}


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass(frozen=True, slots=True)
class CpioEntry:
    name: str
    kind: str  # dir | file | symlink | chardev | blockdev | fifo
    mode: int  # permission bits incl. suid/sgid/sticky
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0  # data length; for a symlink, the length of its target
    rdevmajor: int = 0
    rdevminor: int = 0


class CpioWriter:
    """Yields an archive's bytes entry by entry; `offset` counts what was yielded (padding is
    relative to it). `add`/`close` write the same bytes to a sink instead."""

    def __init__(self, out: Sink | None = None) -> None:
        self.out = out
        self.offset = 0
        self.inode = FIRST_INODE

    def _emit(self, data: bytes) -> bytes:
        self.offset += len(data)
        return data

    def _padding(self, boundary: int) -> bytes:
        return self._emit(b"\0" * (-self.offset % boundary))

    def _header(self, name: str, mode: int, uid: int, gid: int, nlink: int, mtime: int, size: int,
                rdevmajor: int, rdevminor: int) -> bytes:
        encoded = encode_name(name)
        fields = (self.inode, mode, uid, gid, nlink, mtime, size, 3, 1, rdevmajor, rdevminor, len(encoded) + 1, 0)
        if b"\0" in encoded or not all(0 <= f <= MAX_FIELD for f in fields):
            raise ValueError(f"cpio entry {name!r}: a NUL in the name or a field out of range: {fields}")
        self.inode += 1
        head = self._emit(b"070701" + b"".join(b"%08x" % f for f in fields) + encoded + b"\0")
        return head + self._padding(4)

    def entry(self, entry: CpioEntry, data: Iterable[bytes] = ()) -> Iterator[bytes]:
        """One entry's bytes; `data` yields exactly `entry.size` bytes (content or symlink target)."""
        mode = (entry.mode & 0o7777) | _TYPE_BITS[entry.kind]
        yield self._header(entry.name, mode, entry.uid, entry.gid, 2 if entry.kind == "dir" else 1, entry.mtime,
                           entry.size, entry.rdevmajor, entry.rdevminor)
        written = 0
        for chunk in data:
            written += len(chunk)
            yield self._emit(chunk)
        if written != entry.size:
            raise ValueError(f"cpio entry {entry.name!r}: {written} bytes of data, header says {entry.size}")
        tail = self._padding(4)
        if tail:
            yield tail

    def trailer(self) -> Iterator[bytes]:
        yield self._header(TRAILER, 0, 0, 0, 1, 0, 0, 0, 0)
        yield self._padding(512)

    def add(self, entry: CpioEntry, data: Iterable[bytes] = ()) -> None:
        assert self.out is not None
        for chunk in self.entry(entry, data):
            self.out.write(chunk)

    def close(self) -> None:
        assert self.out is not None
        for chunk in self.trailer():
            self.out.write(chunk)


def coalesce(chunks: Iterable[bytes], size: int = 256 << 10) -> Iterator[bytes]:
    """Join small chunks (cpio headers) into pieces of about `size`; big chunks pass through."""
    pending: list[bytes] = []
    held = 0
    for chunk in chunks:
        if len(chunk) >= size:
            if pending:
                yield b"".join(pending)
                pending, held = [], 0
            yield chunk
            continue
        pending.append(chunk)
        held += len(chunk)
        if held >= size:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


def _pad(n: int, boundary: int) -> int:
    return n + (-n % boundary)


def entry_length(name: str, size: int) -> int:
    """Bytes one entry takes (every entry starts 4-aligned, so this is position-independent)."""
    return _pad(110 + len(encode_name(name)) + 1, 4) + _pad(size, 4)


def archive_length(entries: Iterable[CpioEntry]) -> int:
    """The archive's total size, trailer and 512-byte padding included, before writing it."""
    return _pad(sum(entry_length(e.name, e.size) for e in entries) + entry_length(TRAILER, 0), 512)
