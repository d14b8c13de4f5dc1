"""The content-addressed store: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`).

skopeo and umoci read it as `oci:<store>:<ref>`. Invariants:

* a blob's file name is the digest of its bytes: `put` hashes while writing a temp file in the
  same directory, fsyncs it and renames it into place only if the digest (and size) match;
* a blob under its final name was verified when written, so `has` trusts existence, and
  `enclaver cache verify` re-hashes everything when that trust is in question;
* `index.json` (the refs) is changed only under an exclusive `flock`, by atomic replace, so two
  processes pulling at once both land; `gc` takes the same lock and spares fresh blobs, which a
  concurrent pull may have written but not yet tagged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

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
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name}.")
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


class Store:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"

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
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise OperationFailed(f"{digest} is not in the store at {self.root}",
                                  fix="pull the image again (enclaver image pull)") from None

    def read(self, digest: Digest) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def put(self, chunks: Iterable[bytes], expect: Digest | None = None, size: int | None = None,
            source: str = "", progress: Progress | None = None) -> Digest:
        """Write a blob atomically, verifying it against `expect` (and `size`) as it streams.

        On a mismatch the temp file is deleted and `DigestMismatch` raised: nothing is kept.
        When the blob already exists the chunks are still consumed (the caller's stream ends
        cleanly) but nothing is rewritten.
        """
        if expect is not None and expect.algorithm != "sha256":
            raise OperationFailed(f"{expect}: the store keeps sha256 blobs only", fix="use sha256 digests")
        self.blobs.mkdir(parents=True, exist_ok=True)
        if expect is not None and self.has(expect):
            return self._check_only(chunks, expect, size, source, progress)
        hasher = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        count = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    count += len(chunk)
                    if size is not None and count > size:
                        raise DigestMismatch(f"{source or 'blob'}: more than the declared {size} bytes",
                                             fix="the source is corrupt or tampered with; nothing was kept")
                    hasher.update(chunk)
                    f.write(chunk)
                    if progress:
                        progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())
            got = Digest("sha256", hasher.hexdigest())
            if size is not None and count != size:
                raise DigestMismatch(f"{source or 'blob'}: got {count} of {size} bytes of {expect}",
                                     fix="the transfer was cut short; try again (nothing was kept)")
            if expect is not None and got != expect:
                raise DigestMismatch(f"{source or 'blob'}: content is {got}, expected {expect} ({count} bytes)",
                                     fix="the source holds tampered or corrupt data; nothing was kept")
            final = self.path(got)
            if final.exists():
                os.unlink(tmp)
            else:
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
                _fsync_dir(self.blobs)
            return got
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _check_only(self, chunks: Iterable[bytes], expect: Digest, size: int | None, source: str,
                    progress: Progress | None) -> Digest:
        """The blob is already kept: still read and verify the stream (a caller's bug or a bad
        source is reported the same), but write, fsync and rename nothing."""
        hasher, count = hashlib.sha256(), 0
        for chunk in chunks:
            count += len(chunk)
            hasher.update(chunk)
            if progress:
                progress(len(chunk))
        if (size is not None and count != size) or hasher.hexdigest() != expect.hex:
            raise DigestMismatch(f"{source or 'blob'}: content does not match {expect} ({count} bytes)",
                                 fix="the source holds tampered or corrupt data; nothing was kept")
        return expect

    def put_bytes(self, data: bytes, expect: Digest | None = None, source: str = "") -> Digest:
        return self.put([data], expect, len(data), source)

    def put_stream(self, stream: Readable, expect: Digest | None = None, size: int | None = None,
                   source: str = "", progress: Progress | None = None) -> Digest:
        return self.put(iter(lambda: stream.read(CHUNK), b""), expect, size, source, progress)

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
        binary, a release's EIF)."""
        import shutil
        import tarfile

        wanted = path.strip("/")
        for layer in reversed(manifest.layers):
            with self.open(layer.digest) as blob, tarfile.open(fileobj=blob, mode="r:*") as tar:
                for member in tar:
                    if member.name.lstrip("./").rstrip("/") == wanted and member.isfile():
                        source = tar.extractfile(member)
                        assert source is not None
                        shutil.copyfileobj(source, out, 1 << 20)
                        return True
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
        """Re-hash every blob; report misnamed blobs, and refs whose blobs are missing."""
        problems = []
        for path in sorted(self.blobs.iterdir()) if self.blobs.is_dir() else []:
            if path.name.startswith("."):
                continue
            hasher = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(CHUNK), b""):  # type: ignore[misc]
                    hasher.update(chunk)
                    if progress:
                        progress(len(chunk))
            if hasher.hexdigest() != path.name:
                problems.append(Problem(str(path), f"content is sha256:{hasher.hexdigest()}, not sha256:{path.name}"))
        for name, descriptor in self.refs().items():
            if not self.has(descriptor.digest):
                problems.append(Problem(name, f"ref points at {descriptor.digest}, which is missing"))
        return problems

    def gc(self, grace_seconds: int = GC_GRACE_SECONDS, now: float | None = None) -> tuple[int, int]:
        """Delete blobs no ref reaches (older than the grace period). Returns (count, bytes)."""
        now = time.time() if now is None else now
        with self._locked():
            keep = {d.hex for d in self.reachable()}
            removed = freed = 0
            for path in self.blobs.iterdir() if self.blobs.is_dir() else []:
                stat = path.stat()
                if path.name in keep or now - stat.st_mtime < grace_seconds:
                    continue
                path.unlink()
                removed += 1
                freed += stat.st_size
        return removed, freed
