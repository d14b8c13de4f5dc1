"""The content-addressed store: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`).

skopeo and umoci read it as `oci:<store>:<ref>`. Invariants:

* a blob's file name is the digest of its bytes: `put` hashes while writing a temp file in the
  same directory, fsyncs it and renames it into place only if the digest (and size) match;
* a blob under its final name was verified when written, so `has` trusts existence; but bytes
  rot on disk, so every *read* verifies again, as it streams: `open` hashes each byte once, in
  file order, as the reader reaches it, and `read` and `copy_file` go through it. A blob whose
  bytes no longer match its name is moved to `quarantine/` (never deleted, never used) and
  `CorruptBlob` names the digest, the file and the fix; the next pull fetches it again, since the
  store no longer has it. `enclaver cache verify` re-hashes everything and quarantines the same way;
* staging (temp files and directories) carries its writer's PID in its name, so `gc` can remove
  what dead writers left behind and spare live ones (`STAGING` lists every name the cache's
  writers use);
* `index.json` (the refs) is changed only under an exclusive `flock`, by atomic replace, so two
  processes pulling at once both land; `gc` takes the same lock and spares fresh blobs, which a
  concurrent pull may have written but not yet tagged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.model import Descriptor, Index, Manifest, parse

if TYPE_CHECKING:
    from enclaver_rules.oci.mutate import EditedImage

REF_ANNOTATION = "org.opencontainers.image.ref.name"
CHUNK = 1 << 20
#: gc leaves blobs younger than this alone: a concurrent pull may not have tagged them yet.
GC_GRACE_SECONDS = 3600
#: Where blobs whose bytes no longer match their names are moved (relative to the store root).
QUARANTINE = "quarantine"
#: Staging whose writer cannot be identified (no /proc) is removed only when this old.
STAGING_MAX_AGE = 7 * 24 * 3600
#: How much later than a staging's last change its PID's process may have started and still be
#: taken for its writer (/proc/stat's boot time has one-second resolution).
PID_REUSE_SLACK = 5.0

Progress = Callable[[int], None]


class Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


def default_cache_dir(start: str | None = None) -> Path:
    """`$ENC_CACHE_DIR`; else the `cache/` beside the nearest `dodo.py` above `start` that has one
    or uses enclaver's rule set (so `enclaver build` and `doit` share one cache even before the
    first `doit` made it); else `$XDG_CACHE_HOME/enclaver` (default `~/.cache/enclaver`)."""
    env = os.environ.get("ENC_CACHE_DIR")
    if env:
        return Path(env)
    here = Path(start or os.getcwd()).resolve()
    for directory in (here, *here.parents):
        dodo = directory / "dodo.py"
        if dodo.is_file() and ((directory / "cache").is_dir() or _uses_rule_set(dodo)):
            return directory / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "enclaver"


def _uses_rule_set(dodo: Path) -> bool:
    try:
        return b"enclaver_rules" in dodo.read_bytes()[:65536]
    except OSError:
        return False


class _Metered:
    """A blob's chunks as they pass: counted, held to the declared size, hashed and reported. One
    loop for writing a new blob and for checking one the store already keeps."""

    def __init__(self, chunks: Iterable[bytes], size: int | None, source: str, hasher: Any,
                 progress: Progress | None) -> None:
        self._chunks, self._size, self._source, self._hasher, self._progress = chunks, size, source, hasher, progress
        self.count = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.count += len(chunk)
            if self._size is not None and self.count > self._size:
                raise DigestMismatch(f"{self._source or 'blob'}: more than the declared {self._size} bytes",
                                     fix="the source is corrupt or tampered with; nothing was kept")
            self._hasher.update(chunk)
            if self._progress:
                self._progress(len(chunk))
            yield chunk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write `path` all or nothing: yields a temp file in the same directory (seekable), which is
    fsynced and renamed over `path` when the block succeeds and deleted when it raises."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".",
                               prefix=f".{target.name}.tmp-{os.getpid()}-")  # the PID: see STAGING
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent if str(target.parent) else Path("."))


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, all or nothing."""
    with atomic_file(path) as f:
        f.write(data)


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    message: str


class CorruptBlob(DigestMismatch):
    """A blob in the store whose bytes no longer match its name (rot, a truncated file, an edit):
    moved to quarantine when it could be, and never used."""


class VerifiedBlob(io.RawIOBase):
    """A store blob opened for reading, verified against its digest as it is read.

    Every byte is hashed exactly once, in file order, when the reader first reaches it: a read
    hashes what it returns, a forward seek (tarfile skipping a member's data) hashes the bytes it
    skips when the next read comes, a backward seek (a retried upload) hashes nothing again. When
    the hashed prefix reaches the end of the file the digest is compared; on a mismatch the file
    is moved to quarantine and `CorruptBlob` raised (from that read, or from `finish`).

    A reader that stops before the end (a tar's trailing padding, a member found early) calls
    `finish()`, or uses `with`: leaving the block hashes the rest and raises `CorruptBlob` before
    the caller goes on with what it read. Leaving it with an exception also checks (a "broken
    layer" is often a corrupt blob, and then `CorruptBlob` is the error worth showing), except
    after KeyboardInterrupt and the like. Bytes returned before the end are unverified: a caller
    writes them only somewhere it discards when `CorruptBlob` is raised.

    `close()` (a BufferedReader wrapping this one closes it when collected) keeps the file
    descriptor until `finish()` or the end of the `with` block, so a late `finish()` still works.
    """

    def __init__(self, path: Path, digest: Digest, on_corrupt: Callable[[os.stat_result, str, int], CorruptBlob]) -> None:
        super().__init__()
        self.digest = digest
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._release = weakref.finalize(self, os.close, self._fd)
        self._stat = os.fstat(self._fd)
        self._on_corrupt = on_corrupt
        self._hasher = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in the hasher
        self._pos = 0
        self.verified = False
        self._error: CorruptBlob | None = None

    # -- the file API --------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = os.fstat(self._fd).st_size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read of a closed blob")
        if size is None or size < 0:
            return self.readall()
        self._catch_up(self._pos)
        data = os.pread(self._fd, size, self._pos)
        self._advance(data, size)
        return data

    def readall(self) -> bytes:
        parts = []
        while chunk := self.read(CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("read of a closed blob")
        view = memoryview(buffer).cast("B")
        self._catch_up(self._pos)
        n = os.preadv(self._fd, [view], self._pos)
        self._advance(view[:n], len(view))
        return n

    def close(self) -> None:
        super().close()  # the descriptor stays until finish() or __exit__ (see the class note)
        if self.verified or self._error is not None:
            self._release()

    def __enter__(self) -> VerifiedBlob:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if error is None:
                self.finish()
            elif isinstance(error, Exception) and not isinstance(error, CorruptBlob) and self._error is None:
                try:
                    self.finish()
                except CorruptBlob as corrupt:
                    raise corrupt from error
        finally:
            self.close()
            self._release()

    # -- verification --------------------------------------------------------------------------

    def finish(self) -> None:
        """Hash whatever was not read yet and compare: returns when the blob is intact, else
        raises `CorruptBlob` (the blob is in quarantine by then)."""
        if self._error is not None:
            raise self._error
        if not self.verified:
            self._catch_up(None)

    def _advance(self, data: Any, asked: int) -> None:
        n = len(data)
        start = self._pos
        if start <= self._hashed < start + n:
            self._hasher.update(data[self._hashed - start:])
            self._hashed = start + n
        self._pos = start + n
        if n == 0 and asked > 0 and self._hashed >= start:
            self._check()  # the end of the file, with every byte before it hashed

    def _catch_up(self, to: int | None) -> None:
        """Hash the bytes between the hashed prefix and `to` (None: the end of the file)."""
        while to is None or self._hashed < to:
            want = CHUNK if to is None else min(CHUNK, to - self._hashed)
            chunk = os.pread(self._fd, want, self._hashed)
            if not chunk:
                self._check()
                return
            self._hasher.update(chunk)
            self._hashed += len(chunk)

    def _check(self) -> None:
        if self.verified:
            return
        if self._error is None:
            got = self._hasher.hexdigest()
            if got == self.digest.hex:
                self.verified = True
                return
            self._error = self._on_corrupt(self._stat, got, self._hashed)
        raise self._error


@dataclass(frozen=True, slots=True)
class Staging:
    """A temp file or directory a writer of the cache left (or is still using)."""

    path: Path
    pid: int | None  # the writer's, when the name carries it
    mtime: float
    size: int


#: Every staging name the cache's writers use: (directory relative to the cache root, glob
#: `*` = one level, name pattern with the writer's PID as group `pid` when the name has one).
#: A writer that stages under a new name adds it here; a name without a PID is removed only for
#: its age. The legacy forms (no PID) are what older versions of enclaver wrote.
_ATOMIC = r"\..+\.tmp-(?P<pid>\d+)-[a-z0-9_]{8}"  # atomic_file(), anywhere
STAGING: tuple[tuple[str, re.Pattern[str]], ...] = (
    (".", re.compile(_ATOMIC)),
    (".", re.compile(r"\.(?:index\.json|oci-layout)\.[a-z0-9_]{8}")),  # atomic_file(), legacy
    ("blobs/sha256", re.compile(r"\.tmp-(?P<pid>\d+)-[a-z0-9_]{8}")),  # Store.put
    ("blobs/sha256", re.compile(r"\.tmp-[a-z0-9_]{8}")),  # Store.put, legacy
    # a blob set being taken from an image: `<image hex>-<arch>.tmp-PID` (eif/blobs.py
    # load_image_blobs), `<image hex>.tmp-PID` (cli/eif.py before it)
    ("blobs", re.compile(r"[0-9a-f]{64}(?:-[a-z0-9_]+)?\.tmp-(?P<pid>\d+)")),
    ("out/*", re.compile(r"\.tmp-[0-9a-f]{32}-(?P<pid>\d+)")),  # an EIF entry being built (rules/eif.py)
    ("out/*", re.compile(r"\.latest-(?P<pid>\d+)")),  # the `latest` link being replaced (rules/common.py)
    ("out/*", re.compile(_ATOMIC)),
    ("out/*", re.compile(r"\..+\.json\.[a-z0-9_]{8}")),  # atomic_file(), legacy
    ("out/*/*", re.compile(_ATOMIC)),
    ("out/*/*", re.compile(r"\..+\.json\.[a-z0-9_]{8}")),  # atomic_file(), legacy
    ("odyn-build", re.compile(r"odyn-build-[a-z0-9_]{8}")),  # the odyn build tree (odyn_image/build.py)
    ("odyn-build", re.compile(r"odyn(?:-aarch64)?\.partial")),
)


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when that cannot be read."""
    boot = _boot_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None
    return None if boot is None else boot + ticks / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def is_stale(entry: Staging, grace_seconds: float, now: float) -> bool:
    """Whether a staging entry's writer is gone, so removing it hurts nobody.

    Younger than the grace period: kept (a writer in another PID namespace, e.g. a container
    sharing the cache, looks dead from here). No PID in the name: stale once past the grace.
    A dead PID: stale. A live PID is another process when it started after the entry last
    changed (its writer's PID was reused): stale. A live PID whose start cannot be read: kept,
    unless older than STAGING_MAX_AGE.
    """
    age = now - entry.mtime
    if age < grace_seconds:
        return False
    if entry.pid is None or not pid_alive(entry.pid):
        return True
    started = process_start(entry.pid)
    if started is None:
        return age > STAGING_MAX_AGE
    return started > entry.mtime + PID_REUSE_SLACK


class _Trusted:
    """Stands in for `put`'s hasher when the bytes come from a `VerifiedBlob` read to its end."""

    def __init__(self, blob: VerifiedBlob) -> None:
        self.blob = blob

    def update(self, data: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        self.blob.finish()  # raises CorruptBlob when the source had rotted
        return self.blob.digest.hex


class Store:
    def __init__(self, root: str | os.PathLike[str], *, quarantine: bool = True) -> None:
        """`quarantine=False` for a layout that is not ours (`oci:DIR` being imported): a corrupt
        blob there is reported, never moved."""
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.quarantine_dir = self.root / QUARANTINE if quarantine else None

    # -- layout ----------------------------------------------------------------------------------

    def init(self) -> Store:
        self.blobs.mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}')
        with self._locked():
            if not (self.root / "index.json").exists():
                self._write_index([])
        return self

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- blobs -----------------------------------------------------------------------------------

    def path(self, digest: Digest) -> Path:
        if digest.algorithm != "sha256":
            raise OperationFailed(f"{digest}: the store keeps sha256 blobs only", fix="use sha256 digests")
        return self.blobs / digest.hex

    def has(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def open(self, digest: Digest) -> BinaryIO:
        """The blob, verified as it is read: a `VerifiedBlob` (use `with`, or call `finish()`),
        typed as the file it stands in for."""
        return cast(BinaryIO, self.open_verified(digest))

    def open_verified(self, digest: Digest) -> VerifiedBlob:
        """`open`, typed for a caller that calls `finish()` itself."""
        path = self.path(digest)
        try:
            return VerifiedBlob(path, digest, lambda stat, got, size: self._corrupt(digest, path, stat, got, size))
        except FileNotFoundError:
            raise OperationFailed(f"{digest} is not in the store at {self.root}",
                                  fix="pull the image again (enclaver image pull)") from None

    def intact(self, digest: Digest) -> bool:
        """Whether the blob is here with the bytes its name says, hashed now (one streaming read);
        a damaged one is moved to quarantine and counts as absent."""
        try:
            with self.open_verified(digest) as blob:
                blob.finish()
        except OperationFailed:  # CorruptBlob, or not in the store
            return False
        return True

    def read(self, digest: Digest) -> bytes:
        """The whole blob (manifests, configs: small), verified."""
        with self.open(digest) as f:
            return f.read()

    def _corrupt(self, digest: Digest, path: Path, stat: os.stat_result, got: str, size: int) -> CorruptBlob:
        moved = self.quarantine(digest, stat)
        message = (f"{digest} in the store at {self.root} is corrupt: its file {path} holds {size} bytes whose "
                   f"digest is sha256:{got}")
        if moved is not None:
            fix = (f"it was moved to {moved} and is not used; run `enclaver cache verify` to check the rest of the "
                   f"store, then pull the image again (a build fetches it again from its registry)")
        elif self.quarantine_dir is None:
            fix = "this layout is damaged: copy the image into it again"
        else:
            fix = f"delete {path} (`enclaver cache verify` moves damaged blobs aside), then pull the image again"
        return CorruptBlob(message, fix=fix)

    def quarantine(self, digest: Digest, read: os.stat_result | None = None, *, keep_name: bool = False) -> Path | None:
        """Move a blob whose bytes do not match its name to `quarantine/` (kept for inspection,
        never used again). Only the file that was read moves: when `read` (its stat) is given and
        the name now holds another file (a writer healed it meanwhile), nothing moves.
        `keep_name`: hard-link it there instead, for a caller about to replace it atomically.
        Returns where it went, or None when nothing moved (gone, replaced, or not ours to move)."""
        if self.quarantine_dir is None:
            return None
        path = self.path(digest)
        try:
            now = os.lstat(path)
            if read is not None and (now.st_dev, now.st_ino) != (read.st_dev, read.st_ino):
                return None
            self.quarantine_dir.mkdir(exist_ok=True)
            stem = f"sha256-{digest.hex}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            for n in range(100):
                dest = self.quarantine_dir / (stem if n == 0 else f"{stem}-{n}")
                if os.path.lexists(dest):
                    continue
                if keep_name:
                    os.link(path, dest)  # refuses to overwrite: a race is an OSError, nothing lost
                else:
                    os.rename(path, dest)
                return dest
        except OSError:
            pass
        return None

    def quarantined(self) -> list[Path]:
        """What is in quarantine (damaged copies; delete them when done looking)."""
        q = self.quarantine_dir
        return sorted(q.iterdir()) if q is not None and q.is_dir() else []

    def put(self, chunks: Iterable[bytes], expect: Digest | None = None, size: int | None = None,
            source: str = "", progress: Progress | None = None, *, hashed_by: VerifiedBlob | None = None) -> Digest:
        """Write a blob atomically, verifying it against `expect` (and `size`) as it streams.

        On a mismatch the temp file is deleted and `DigestMismatch` raised: nothing is kept.
        When the blob already exists the chunks are still consumed (the caller's stream ends
        cleanly) and compared with the kept copy; nothing is rewritten unless that copy has rotted.
        `hashed_by`: the chunks are that blob's, read from its start to its end, and it verifies
        itself (another store's blob): its digest is trusted rather than hashed a second time.
        """
        if expect is not None and expect.algorithm != "sha256":
            raise OperationFailed(f"{expect}: the store keeps sha256 blobs only", fix="use sha256 digests")
        self.blobs.mkdir(parents=True, exist_ok=True)
        hasher: Any = _Trusted(hashed_by) if hashed_by is not None else hashlib.sha256()
        if expect is not None and self.has(expect):
            return self._check_only(chunks, expect, size, source, progress, hasher)
        f, tmp = self._temp()
        metered = _Metered(chunks, size, source, hasher, progress)
        try:
            with f:
                for chunk in metered:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            count = metered.count
            got = Digest("sha256", hasher.hexdigest())
            if size is not None and count != size:
                raise DigestMismatch(f"{source or 'blob'}: got {count} of {size} bytes of {expect}",
                                     fix="the transfer was cut short; try again (nothing was kept)")
            if expect is not None and got != expect:
                raise DigestMismatch(f"{source or 'blob'}: content is {got}, expected {expect} ({count} bytes)",
                                     fix="the source holds tampered or corrupt data; nothing was kept")
            # the bytes are verified: they replace a kept copy too (which may have rotted), atomically
            os.chmod(tmp, 0o444)
            os.replace(tmp, self.path(got))
            _fsync_dir(self.blobs)
            return got
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _temp(self) -> tuple[BinaryIO, str]:
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=f".tmp-{os.getpid()}-")  # the PID: see STAGING
        return os.fdopen(fd, "w+b"), tmp

    def _check_only(self, chunks: Iterable[bytes], expect: Digest, size: int | None, source: str,
                    progress: Progress | None, hasher: Any) -> Digest:
        """The blob is already kept: still read and verify the stream (a caller's bug or a bad
        source is reported the same), and compare the kept copy with it as it goes (no second
        hash). When the copies agree nothing is written, fsynced or renamed; when the kept one
        has rotted, the verified stream replaces it and it goes to quarantine."""
        path = self.path(expect)
        try:
            kept: BinaryIO | None = open(path, "rb")  # noqa: SIM115 - closed in finally
        except FileNotFoundError:
            kept = None  # collected meanwhile: written again below
        fresh: tuple[BinaryIO, str] | None = self._temp() if kept is None else None
        metered = _Metered(chunks, size, source, hasher, progress)
        try:
            for chunk in metered:
                if fresh is None:
                    assert kept is not None
                    if kept.read(len(chunk)) == chunk:
                        continue
                    fresh = self._heal_from(kept, metered.count - len(chunk))
                fresh[0].write(chunk)
            count = metered.count
            if fresh is None and kept is not None and kept.read(1):
                fresh = self._heal_from(kept, count)  # the kept copy is longer than the blob
            if (size is not None and count != size) or hasher.hexdigest() != expect.hex:
                raise DigestMismatch(f"{source or 'blob'}: content does not match {expect} ({count} bytes)",
                                     fix="the source holds tampered or corrupt data; nothing was kept")
            if fresh is not None:
                f, tmp = fresh
                f.flush()
                os.fsync(f.fileno())
                f.close()
                if kept is not None:
                    self.quarantine(expect, os.fstat(kept.fileno()), keep_name=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, path)
                _fsync_dir(self.blobs)
                fresh = None
            return expect
        finally:
            if kept is not None:
                kept.close()
            if fresh is not None:
                fresh[0].close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(fresh[1])

    def _heal_from(self, kept: BinaryIO, agreed: int) -> tuple[BinaryIO, str]:
        """A temp file starting with the kept copy's first `agreed` bytes (equal to the stream's)."""
        f, tmp = self._temp()
        kept.seek(0)
        left = agreed
        while left:
            chunk = kept.read(min(CHUNK, left))
            if not chunk:
                break
            f.write(chunk)
            left -= len(chunk)
        return f, tmp

    def put_bytes(self, data: bytes, expect: Digest | None = None, source: str = "") -> Digest:
        return self.put([data], expect, len(data), source)

    def put_stream(self, stream: Readable, expect: Digest | None = None, size: int | None = None,
                   source: str = "", progress: Progress | None = None) -> Digest:
        """`stream` read to its end. A `VerifiedBlob` of the digest expected, read from its start,
        verifies itself (and quarantines in its own store): its bytes are not hashed twice."""
        trusted = stream if isinstance(stream, VerifiedBlob) and stream.tell() == 0 and \
            expect in (None, stream.digest) else None
        return self.put(iter(lambda: stream.read(CHUNK), b""), expect, size, source, progress, hashed_by=trusted)

    # -- refs ------------------------------------------------------------------------------------

    def _read_index(self) -> list[dict[str, Any]]:
        try:
            data = json.loads((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            return []
        manifests = data.get("manifests", [])
        return manifests if isinstance(manifests, list) else []

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}
        atomic_write(self.root / "index.json", json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")

    def tag(self, name: str, descriptor: Descriptor) -> None:
        """Point ref `name` at `descriptor` (replacing what it pointed at); the blob must exist."""
        if not self.has(descriptor.digest):
            raise OperationFailed(f"cannot tag {name}: {descriptor.digest} is not in the store", fix="a bug: report it")
        entry = descriptor.to_json()
        entry["annotations"] = {**entry.get("annotations", {}), REF_ANNOTATION: name}
        with self._locked():
            current = self._read_index()
            if entry in current:
                return  # already so: no rewrite (a no-op build tags every image again)
            manifests = [m for m in current if (m.get("annotations") or {}).get(REF_ANNOTATION) != name]
            manifests.append(entry)
            manifests.sort(key=lambda m: m["annotations"][REF_ANNOTATION] if "annotations" in m else "")
            self._write_index(manifests)

    def keep_image(self, name: str, edited: EditedImage) -> Descriptor:
        """Store an image made here (its config and manifest; its layers are already in) and tag it."""
        self.put_bytes(edited.config, edited.config_digest, source=f"{name} config")
        self.put_bytes(edited.manifest, edited.manifest_digest, source=f"{name} manifest")
        descriptor = Descriptor(mt.OCI_MANIFEST, edited.manifest_digest, len(edited.manifest))
        self.tag(name, descriptor)
        return descriptor

    def copy_file(self, manifest: Manifest, path: str, out: BinaryIO) -> bool:
        """Copy one regular file of an image to `out`, as the merged root file system has it (the
        topmost layer holding it wins), streamed from its layer; False when no layer has it.
        Whiteouts are not followed: this is for files an image is known to carry (odyn's
        binary, a release's EIF). Each layer read is verified to its end, after the copy: on
        `CorruptBlob` what was written to `out` must be thrown away."""
        import tarfile

        wanted = path.strip("/")
        for layer in reversed(manifest.layers):
            with self.open(layer.digest) as blob, tarfile.open(fileobj=blob, mode="r:*") as tar:
                for member in tar:
                    if member.name.lstrip("./").rstrip("/") == wanted and member.isfile():
                        source = tar.extractfile(member)
                        assert source is not None
                        shutil.copyfileobj(source, out, 1 << 20)
                        return True  # leaving the `with` verifies the rest of the blob
        return False

    def untag(self, name: str) -> bool:
        with self._locked():
            before = self._read_index()
            after = [m for m in before if (m.get("annotations") or {}).get(REF_ANNOTATION) != name]
            if len(after) != len(before):
                self._write_index(after)
            return len(after) != len(before)

    def refs(self) -> dict[str, Descriptor]:
        out = {}
        for m in self._read_index():
            name = (m.get("annotations") or {}).get(REF_ANNOTATION)
            if name:
                out[name] = Descriptor.from_json(m, f"{self.root}/index.json")
        return out

    def resolve(self, name: str) -> Descriptor | None:
        return self.refs().get(name)

    def manifest(self, digest: Digest, media_type: str | None = None) -> Manifest | Index:
        return parse(self.read(digest), media_type, f"{self.root}: {digest.short}")

    # -- maintenance -----------------------------------------------------------------------------

    def reachable(self) -> set[Digest]:
        """Every blob some ref reaches: manifests, indexes (and the children they hold), configs, layers."""
        seen: set[Digest] = set()
        todo = [d.digest for d in self.refs().values()]
        while todo:
            digest = todo.pop()
            if digest in seen or not self.has(digest):
                continue
            seen.add(digest)
            try:
                node = self.manifest(digest)
            except OperationFailed:
                continue  # a blob that is not a manifest: a leaf
            if isinstance(node, Index):
                todo += [d.digest for d in node.manifests]
            else:
                todo += [node.config.digest, *(d.digest for d in node.layers)]
        return seen

    def verify(self, progress: Progress | None = None) -> list[Problem]:
        """Re-hash every blob; report misnamed blobs (moved to quarantine), and refs whose blobs
        are missing."""
        problems = []
        for path in sorted(self.blobs.iterdir()) if self.blobs.is_dir() else []:
            if path.name.startswith("."):
                continue  # staging: `gc` removes it once its writer is gone
            hasher = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    read = os.fstat(f.fileno())
                    for chunk in iter(lambda f=f: f.read(CHUNK), b""):  # type: ignore[misc]
                        hasher.update(chunk)
                        if progress:
                            progress(len(chunk))
            except FileNotFoundError:
                continue  # collected meanwhile
            if hasher.hexdigest() != path.name:
                message = f"content is sha256:{hasher.hexdigest()}, not sha256:{path.name}"
                moved = self.quarantine(Digest("sha256", path.name), read) if _HEX64.fullmatch(path.name) else None
                problems.append(Problem(str(path), message + (f"; moved to {moved}" if moved else "")))
        for name, descriptor in self.refs().items():
            if not self.has(descriptor.digest):
                problems.append(Problem(name, f"ref points at {descriptor.digest}, which is missing"))
        return problems

    def staging(self) -> list[Staging]:
        """Every temp file and directory of the cache's writers (`STAGING`), live or not."""
        found: dict[Path, Staging] = {}
        for where, pattern in STAGING:
            for directory in _dirs(self.root, where):
                try:
                    names = os.listdir(directory)
                except OSError:
                    continue
                for name in names:
                    m = pattern.fullmatch(name)
                    path = directory / name
                    if m is None or path in found:
                        continue
                    try:
                        st = os.lstat(path)
                    except FileNotFoundError:
                        continue
                    pid = m.groupdict().get("pid")
                    found[path] = Staging(path, int(pid) if pid else None, st.st_mtime, st.st_size)
        return sorted(found.values(), key=lambda e: str(e.path))

    def remove_stale_staging(self, grace_seconds: float = GC_GRACE_SECONDS, now: float | None = None) -> list[Staging]:
        """Remove staging whose writer is gone (`is_stale`); returns what was removed."""
        now = time.time() if now is None else now
        removed = []
        for entry in self.staging():
            if not is_stale(entry, grace_seconds, now):
                continue
            try:
                if os.path.isdir(entry.path) and not os.path.islink(entry.path):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry)
        return removed

    def gc(self, grace_seconds: int = GC_GRACE_SECONDS, now: float | None = None, *,
           staging: list[Staging] | None = None) -> tuple[int, int]:
        """Delete blobs no ref reaches (older than the grace period), and staging dead writers
        left (appended to `staging` when given). Returns (count, bytes) of the blobs."""
        now = time.time() if now is None else now
        with self._locked():
            removed_staging = self.remove_stale_staging(grace_seconds, now)
            if staging is not None:
                staging.extend(removed_staging)
            keep = {d.hex for d in self.reachable()}
            removed = freed = 0
            for path in self.blobs.iterdir() if self.blobs.is_dir() else []:
                if path.name.startswith("."):
                    continue  # staging: removed above only when its writer is gone
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                if path.name in keep or now - stat.st_mtime < grace_seconds:
                    continue
                path.unlink()
                removed += 1
                freed += stat.st_size
        return removed, freed


_HEX64 = re.compile(r"[0-9a-f]{64}")


class BackgroundCheck:
    """Store blobs verified by one worker thread while the caller goes on (hashlib releases the
    GIL, so the hashing runs beside the caller's own work), for a reader that consumes a blob out
    of order: eif/rootfs.py reads a plain tar's headers by seeking and its files' bytes later, in
    export order, so no single pass could hash it. `wait()` returns when every blob added is
    intact, else raises `CorruptBlob` (the blob is in quarantine by then): call it before
    anything built from the blobs is kept. A path that is not a store's blob is not checked."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-verify")
        self._jobs: dict[Path, Any] = {}

    def add(self, path: str | os.PathLike[str]) -> None:
        blob = Path(path)
        if blob not in self._jobs and is_store_blob(blob):
            self._jobs[blob] = self._pool.submit(_verify_path, blob)

    def wait(self, path: str | os.PathLike[str] | None = None) -> None:
        """Wait for `path`'s check (None: every one), raising what it found."""
        for blob, job in list(self._jobs.items()):
            if path is None or blob == Path(path):
                job.result()
        if path is None:
            self._pool.shutdown(wait=False)


def _verify_path(path: Path) -> None:
    with open_blob_path(path) as blob:
        blob.finish()


def is_store_blob(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a blob of a store (`<store>/blobs/sha256/<64 hex digits>`)."""
    blob = Path(path)
    return bool(_HEX64.fullmatch(blob.name)) and blob.parent.name == "sha256" and blob.parent.parent.name == "blobs"


def open_blob_path(path: str | os.PathLike[str]) -> VerifiedBlob:
    """A store's blob by its path (`Store.path(digest)`: `<store>/blobs/sha256/<hex>`), opened as
    `Store.open_verified` opens it, for readers that are handed paths (eif/rootfs.py)."""
    blob = Path(path)
    if not is_store_blob(blob):
        raise ValueError(f"{blob} is not a blob of a store (<store>/blobs/sha256/<64 hex digits>)")
    return Store(blob.parent.parent.parent).open_verified(Digest("sha256", blob.name))


def _dirs(root: Path, where: str) -> Iterator[Path]:
    """The real directories (never through a symlink) that `where` (`*` = any one name) names."""
    todo = [root]
    for part in where.split("/"):
        if part == ".":
            continue
        nxt = []
        for directory in todo:
            if part == "*":
                try:
                    nxt += [e for e in (directory / n for n in sorted(os.listdir(directory)))]
                except OSError:
                    continue
            else:
                nxt.append(directory / part)
        todo = [d for d in nxt if d.is_dir() and not d.is_symlink()]
    yield from (d for d in todo if d.is_dir() and not d.is_symlink())
