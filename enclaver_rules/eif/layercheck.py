"""Every layer blob's digest checked before the EIF is kept, hashed from the bytes the build reads anyway.

The ramdisk reads each file's bytes from its layer in export order. For a plain tar that is almost
always the tar's own order (both are sorted by name), so the blob's SHA-256 can be fed from those
very reads: the gaps between them (tar headers, files a higher layer replaced) are read and hashed
as the reads pass them, and what is left at the end by `wait`. So the layers are read once, not
twice (a separate check in tar order beside the export-order reads); reads that go backwards are
served and simply not hashed again, so an unusual order costs a re-read, never a wrong digest.
gzip layers (read whole when inflated) and a failing layer keep the store's own checks, and a
mismatch is always confirmed by the store (`open_blob_path(...).finish()`), which quarantines the
blob and raises its `CorruptBlob`: the same error as before, whichever way it was found.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from enclaver_rules.eif.pipeline import Worker
from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci.store import BackgroundCheck, is_store_blob, open_blob_path

CHUNK = 4 << 20


class LayerDigest:
    """One plain-tar store blob, read by offset; its SHA-256 grows over the prefix read so far."""

    def __init__(self, path: Path, hash_later: Callable[[hashlib._Hash, bytes], None]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._close = weakref.finalize(self, os.close, self._fd)
        self._hash = hashlib.sha256()
        self._hash_later = hash_later  # LayerChecks' one thread, whatever the number of layers
        self._hashed = 0  # bytes [0, _hashed) are queued for the hash

    def _feed(self, data: bytes, offset: int) -> None:
        if offset <= self._hashed < offset + len(data):
            self._hash_later(self._hash, data if offset == self._hashed else data[self._hashed - offset:])
            self._hashed = offset + len(data)

    def _catch_up(self, to: int | None) -> None:
        while to is None or self._hashed < to:
            want = CHUNK if to is None else min(CHUNK, to - self._hashed)
            data = os.pread(self._fd, want, self._hashed)
            if not data:
                return
            self._feed(data, self._hashed)

    def read(self, offset: int, size: int) -> Iterator[bytes]:
        """`size` bytes from `offset`, in pieces of at most 4 MiB."""
        self._catch_up(offset)
        end = offset + size
        while offset < end:
            data = os.pread(self._fd, min(CHUNK, end - offset), offset)
            if not data:
                raise OperationFailed("a layer file ended early", fix="a bug or a full disk: report it")
            self._feed(data, offset)
            offset += len(data)
            yield data

    def finish(self) -> None:
        """Queue what the reads left out (tar headers, replaced files, the end) for the hash."""
        try:
            self._catch_up(None)
        finally:
            self._close()

    def compare(self) -> None:
        """Once every queued byte is hashed: a mismatch goes to the store, which quarantines and raises."""
        if self._hash.hexdigest() != self.path.name:
            open_blob_path(self.path).finish()  # raises CorruptBlob unless the blob changed back meanwhile
            raise OperationFailed(f"{self.path}: the layer changed while the EIF was built", fix="build again")


class LayerChecks:
    """The digests of the store blobs a tree was built from: `BackgroundCheck`'s add/wait, plus
    `read` for the plain tars, whose check rides on the build's own reads (module note)."""

    def __init__(self) -> None:
        self._background = BackgroundCheck()
        self._plain: dict[Path, LayerDigest] = {}
        self._worker: Worker[tuple[hashlib._Hash, bytes]] | None = None

    def add(self, path: str | os.PathLike[str]) -> None:
        blob = Path(path)
        if not is_store_blob(blob) or blob in self._plain:
            return
        with open(blob, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if gzipped:
            self._background.add(blob)
        else:
            self._plain[blob] = LayerDigest(blob, self._hash_later)

    def _hash_later(self, hasher: hashlib._Hash, data: bytes) -> None:
        """Started at the first read, not before: a build that fails earlier leaves no thread behind."""
        if self._worker is None:
            self._worker = Worker("layer-sha256", lambda item: item[0].update(item[1]))
        self._worker.put((hasher, data))

    def reader(self, path: Path) -> LayerDigest | None:
        return self._plain.get(path)

    def wait(self, path: str | os.PathLike[str] | None = None) -> None:
        """Like `BackgroundCheck.wait`: raises what a check found (`CorruptBlob`). For one plain
        blob (a layer that failed to parse) the store checks it now, as it is."""
        if path is not None:
            if Path(path) in self._plain:
                open_blob_path(path).finish()
            else:
                self._background.wait(path)
            return
        plain, self._plain = self._plain, {}  # checked once; later reads go to the files directly
        try:
            try:
                for layer in plain.values():
                    layer.finish()
            finally:
                if self._worker is not None:
                    self._worker.close()
                    self._worker = None
            for layer in plain.values():
                layer.compare()
        finally:
            self._background.wait()
