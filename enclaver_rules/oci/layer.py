"""Deterministic layers: bytes that depend only on content.

Entries are sorted by path; owner 0:0 with no user or group names; one fixed mtime
(SOURCE_DATE_EPOCH, else 0) given as an int so tarfile writes no PAX time records; the
gzip header carries no file name and mtime 0. The same entries give the same diff_id and digest
on every machine (with the same zlib: Debian's and CPython's builds agree; zlib-ng does not).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest

GZIP_LEVEL = 6


def source_date_epoch(environ: dict[str, str] | None = None) -> int:
    """SOURCE_DATE_EPOCH as an int (reproducible-builds.org), 0 when unset."""
    value = (environ if environ is not None else os.environ).get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        from enclaver_rules.errors import InvalidInput

        raise InvalidInput(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds",
                           file="SOURCE_DATE_EPOCH", fix="set it to a Unix time, e.g. $(git log -1 --format=%ct)")
    return int(value)


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a layer. `data` for files; `target` for symlinks and hard links."""

    path: str
    kind: str = "file"  # file | dir | symlink | hardlink
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    source: str = ""  # a file on disk to stream instead of `data` (an EIF of gigabytes stays out of memory)

    @classmethod
    def file(cls, path: str, data: bytes, mode: int = 0o644) -> Entry:
        return cls(path, "file", data, mode)

    @classmethod
    def from_file(cls, path: str, source: str | os.PathLike[str], mode: int = 0o644) -> Entry:
        return cls(path, "file", b"", mode, source=os.fspath(source))

    @classmethod
    def dir(cls, path: str, mode: int = 0o755) -> Entry:
        return cls(path, "dir", mode=mode)

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        return cls(path, "symlink", mode=0o777, target=target)


@dataclass(frozen=True, slots=True)
class Layer:
    """A written layer: its bytes' digest (what manifests list) and its diff_id (what configs list)."""

    digest: Digest
    diff_id: Digest
    size: int
    media_type: str = mt.OCI_LAYER_GZIP


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _Hashing(io.RawIOBase):
    """A write-only sink that hashes and counts what passes on to `out`."""

    def __init__(self, out: _Sink | None) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.hash.update(b)
        self.size += len(b)
        if self.out is not None:
            self.out.write(b)
        return len(b)


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def write_layer(entries: Iterable[Entry], out: BinaryIO, *, mtime: int = 0) -> Layer:
    """Write a gzip-compressed tar layer of `entries` to `out`; missing parent dirs are added."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        path = e.path.strip("/")
        if not path or ".." in path.split("/"):
            raise ValueError(f"layer entry path {e.path!r} is not a relative path inside the image")
        by_path[path] = Entry(path, e.kind, e.data, e.mode, e.target, e.source)
    for path in list(by_path):
        for parent in _parents(path):
            by_path.setdefault(parent, Entry.dir(parent))
    compressed = _Hashing(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0) as gz:
        plain = _Hashing(gz)
        with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(by_path):
                e = by_path[path]
                info = tarfile.TarInfo(path + ("/" if e.kind == "dir" else ""))
                info.mtime, info.uid, info.gid, info.uname, info.gname = int(mtime), 0, 0, "", ""
                info.mode = e.mode
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                elif e.kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, e.target
                elif e.kind == "hardlink":
                    info.type, info.linkname = tarfile.LNKTYPE, e.target.strip("/")
                elif e.source:
                    info.size = os.path.getsize(e.source)
                    with open(e.source, "rb") as f:
                        tar.addfile(info, f)
                    continue
                else:
                    info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data) if e.kind == "file" else None)
    return Layer(Digest("sha256", compressed.hash.hexdigest()), Digest("sha256", plain.hash.hexdigest()),
                 compressed.size)
