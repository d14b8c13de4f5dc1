"""A shared cache of step outputs in an ordinary OCI registry (`--remote-cache`, `ENC_REMOTE_CACHE`).

Bazel's remote cache, without a server of our own: a step's outputs under its key are one OCI
artifact in `REGISTRY/REPO`, tagged `<step>-<key>` (the key is 32 hex digits, so the tag is valid
and names exactly one set of inputs). The artifact's config is the empty descriptor; each output
file is a layer titled with its file name; annotations carry the step, the key and the build's
SOURCE_DATE_EPOCH (never the clock: the same outputs give the same manifest digest, so two CI
runners uploading the same entry agree).

Trust. Every byte fetched is verified against the digest that names it (the manifest against
the digest the registry serves for the tag, each blob as it streams), but the registry itself
chooses which manifest a tag points at. So an entry is a claim, and the caller (`eif`) checks
what it can without rebuilding before it uses one, refusing it otherwise: the key and the
inputs the entry records, the EIF's digest, its structure and CRC (as it streams, beside the
SHA-256, in worker threads: `Landing`, `eif/stream.py`), PCR1 recomputed and compared with the
local blob set's, the metadata, PCR8 and the signature against the local certificate, and the
two records' PCRs against each other. What no check short of a rebuild can prove is that the
application ramdisk came from these inputs, so its PCR0 and PCR2 are taken from the record by
default rather than recomputed: recomputing them costs two SHA-384 passes over the whole ramdisk
(most of a build's hashing, so a fetch would cost nearly what a build does) and proves only that
the record is consistent, which a writer able to forge an entry makes it anyway. A record whose
PCR0 or PCR2 is wrong fails closed: a KMS key policy (or `attestation verify --expect`) pinning
them refuses the EIF the hardware measures, and `doit verify` finds it. With
`ENC_REMOTE_CACHE_CHECK_PCRS=1` they are recomputed too. Give write access to the cache
repository to trusted CI only, read access to developers (`ENC_REMOTE_CACHE_READ_ONLY=1`), and
run `doit verify` in CI.

Failures to reach the cache never fail a build: it is an optimization, so an unreachable registry
is reported and the step builds locally, and a failed upload is reported and the local result kept.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.mutate import canonical_json, rfc3339
from enclaver_rules.oci.store import Progress, Store
from enclaver_rules.rules.common import insecure_registries, progress

if TYPE_CHECKING:  # the registry client (requests, ~70 ms) is imported only when a cache is used: doit
    # imports this module on every run, and a no-op build should not pay for it
    from enclaver_rules.oci.registry import Registry

ENV = "ENC_REMOTE_CACHE"
ENV_READ_ONLY = "ENC_REMOTE_CACHE_READ_ONLY"
ENV_CHECK_PCRS = "ENC_REMOTE_CACHE_CHECK_PCRS"
STEP = "dev.enclaver.cache.step"
KEY = "dev.enclaver.cache.key"
#: An entry's files together: an EIF is as large as the app's root file system, and nothing
#: built for an enclave's memory is near this; a manifest declaring more is refused unread.
MAX_ENTRY_BYTES = 64 << 30


def artifact_type(step: str) -> str:
    return f"application/vnd.enclaver.cache.{step}.v1"


def tag(step: str, key: str) -> str:
    return f"{step}-{key}"


class Poisoned(OperationFailed):
    """An entry that does not hold what its key says: never used, replaced when the cache is writable."""


@dataclass(frozen=True, slots=True)
class OutputFile:
    """One output of a step, as stored: the file name (its title) and its media type."""

    name: str
    media_type: str


def entry_manifest(step: str, key: str, files: Sequence[tuple[OutputFile, Digest, int]], created: int) -> bytes:
    """The artifact manifest of an entry, canonical JSON (same outputs, same bytes). Pure."""
    from enclaver_rules.oci.referrers import EMPTY_DESCRIPTOR, TITLE

    if not files:
        raise InvalidInput("a cache entry needs at least one file", fix="pass the step's outputs")
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": artifact_type(step),
        "config": EMPTY_DESCRIPTOR.to_json(),
        "layers": [Descriptor(f.media_type, digest, size, ((TITLE, f.name),)).to_json() for f, digest, size in files],
        "annotations": {STEP: step, KEY: key, "org.opencontainers.image.created": rfc3339(created)},
    })


@dataclass(frozen=True)
class RemoteCache:
    """One cache repository. `location` is REGISTRY/REPO (e.g. registry.example.com/team/enclaver-cache);
    `check_pcrs`: recompute a fetched EIF's PCR0 and PCR2 too (see Trust above)."""

    location: str
    read_only: bool = False
    check_pcrs: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RemoteCache | None:
        env = os.environ if environ is None else environ
        location = (env.get(ENV) or "").strip()
        if not location:
            return None
        return cls(location, _yes(env.get(ENV_READ_ONLY)), _yes(env.get(ENV_CHECK_PCRS)))

    def _registry(self) -> tuple[Registry, str]:
        from enclaver_rules.oci.reference import Reference
        from enclaver_rules.oci.registry import Registry

        try:
            ref = Reference.parse(self.location)
        except (InvalidInput, ValueError) as e:
            raise InvalidInput(f"{self.location!r} is not a registry repository: {e}", file=ENV,
                               fix="give REGISTRY/REPO, e.g. registry.example.com:5000/enclaver-cache") from None
        return Registry(ref.registry, insecure=ref.registry in insecure_registries()), ref.repository

    def fetch(self, step: str, key: str, into: Path, expect: Sequence[OutputFile],
              taps: Mapping[str, Tap] | None = None) -> dict[str, Digest] | None:
        """Download the entry for (step, key) into the directory `into`, each file verified against
        its digest as it streams; the files' digests, or None when there is none or the cache cannot
        be reached (said on stdout). Raises Poisoned when the entry is not what an entry for this
        key must look like. `taps`, by file name: fed that file's bytes as they stream (`Tap`)."""
        from enclaver_rules.oci.referrers import TITLE, parse_artifact
        from enclaver_rules.oci.registry import NotFound, RegistryUnavailable

        registry, repository = self._registry()
        where = f"{self.location}:{tag(step, key)}"
        try:
            raw, _ = registry.get_manifest(repository, tag(step, key))
        except NotFound:
            return None
        except RegistryUnavailable as e:
            print(f"remote cache {self.location} unreachable, building locally: {e}")
            return None
        parsed = parse_artifact(raw, where)
        notes = dict(parsed.annotations)
        if parsed.artifact_type != artifact_type(step) or notes.get(KEY) != key or notes.get(STEP) != step:
            raise Poisoned(f"{where}: the entry says it is {notes.get(STEP)!r} {notes.get(KEY)!r} "
                           f"({parsed.artifact_type}), not {step} {key}",
                           fix="something else wrote this tag; it is replaced when this cache is writable")
        titles = {d.annotation(TITLE): d for d in parsed.layers}
        wanted = {f.name for f in expect}
        if set(titles) != wanted or len(parsed.layers) != len(wanted):
            raise Poisoned(f"{where}: holds {sorted(str(t) for t in titles)}, an entry holds {sorted(wanted)}",
                           fix="the entry is incomplete or was tampered with")
        if sum(d.size for d in parsed.layers) > MAX_ENTRY_BYTES:
            raise Poisoned(f"{where}: declares more than {MAX_ENTRY_BYTES >> 30} GiB", fix="not an enclaver entry")
        try:
            for f in expect:
                descriptor = titles[f.name]
                landing = Landing(into / f.name, (taps or {}).get(f.name))
                with progress(f"fetch {f.name}", descriptor.size) as advance:
                    registry.fetch_blob(repository, descriptor, landing, progress=advance)
                if not landing.landed:
                    raise OperationFailed(f"{where}: {f.name} was not written", fix="a bug: report it")
        except RegistryUnavailable as e:
            print(f"remote cache {self.location}: download failed, building locally: {e}")
            return None
        return {f.name: titles[f.name].digest for f in expect}

    def upload(self, step: str, key: str, directory: Path, files: Sequence[OutputFile], created: int,
               known: Mapping[str, Digest] | None = None) -> Digest | None:
        """Store the step's outputs (files of `directory`) as the entry for (step, key); None when
        read-only or when the upload failed (said on stdout: the local build stands). `known`: digests
        the step already computed, by file name (an EIF is not hashed a second time)."""
        from enclaver_rules.oci.referrers import EMPTY_DESCRIPTOR

        if self.read_only:
            return None
        registry, repository = self._registry()  # a malformed location is the user's to fix: raised
        try:
            described = []
            for f in files:
                path = directory / f.name
                digest = (known or {}).get(f.name) or Digest.of_file(path)
                size = path.stat().st_size
                descriptor = Descriptor(f.media_type, digest, size)
                with progress(f"store {f.name}", size) as advance:
                    registry.push_blob(repository, descriptor, functools.partial(_open, path), progress=advance)
                described.append((f, digest, size))
            registry.push_blob(repository, EMPTY_DESCRIPTOR, _empty)
            raw = entry_manifest(step, key, described, created)
            return registry.put_manifest(repository, tag(step, key), raw, mt.OCI_MANIFEST)
        except OperationFailed as e:
            print(f"remote cache {self.location}: upload of {step} {key} failed, the local build stands: {e}")
            return None


class Tap(Protocol):
    """Sees a fetched file's bytes as they stream (`update`, the very chunks written), then is told
    (`landed`) the digest verified over them, their count and the file's stat, once the file is in
    place under its name; nothing is landed after a failure. `close` ends what it runs (threads),
    idempotent."""

    def update(self, chunk: bytes) -> None: ...
    def landed(self, digest: Digest, size: int, stat: os.stat_result) -> None: ...
    def close(self) -> None: ...


class Landing(Store):
    """Where `Registry.fetch_blob` streams one file of an entry: straight to `target` (under a temp
    name in its directory, renamed once its digest and size are verified; deleted otherwise),
    without a store's layout, index or lock. The SHA-256 and the file write run in worker threads,
    the write with O_DIRECT where the disk allows it (eif/direct.py: the CPU is busy hashing), and
    `tap` is fed the same chunks in the same order, so the reading thread only reads."""

    def __init__(self, target: Path, tap: Tap | None = None) -> None:
        super().__init__(target.parent, quarantine=False)
        self.target, self.tap = target, tap
        self.landed = False

    def has(self, digest: Digest) -> bool:
        return False  # always streamed: a tap sees every byte, and fetch_blob never skips the download

    def put(self, chunks: Iterable[bytes], expect: Digest | None = None, size: int | None = None,
            source: str = "", progress: Progress | None = None, *, hashed_by: Any = None) -> Digest:
        import hashlib

        from enclaver_rules.eif.direct import FileSink
        from enclaver_rules.eif.pipeline import Worker
        from enclaver_rules.oci.digest import DigestMismatch

        if expect is None or expect.algorithm != "sha256" or size is None:
            raise OperationFailed(f"{source}: a fetched file needs a sha256 digest and a size", fix="a bug: report it")
        tmp = self.target.with_name(f".{self.target.name}.fetch-{os.getpid()}")
        hasher = hashlib.sha256()
        count = 0
        try:
            with open(tmp, "wb") as f:
                sink = FileSink(f, size)
                writer, sha = Worker("fetch-write", sink.write), Worker("fetch-sha256", hasher.update)
                try:
                    for chunk in chunks:
                        count += len(chunk)
                        if count > size:
                            raise DigestMismatch(f"{source}: more than the declared {size} bytes",
                                                 fix="the source is corrupt or tampered with; nothing was kept")
                        sha.put(chunk)
                        writer.put(chunk)
                        if self.tap is not None:
                            self.tap.update(chunk)
                        if progress:
                            progress(len(chunk))
                finally:  # both workers stopped whatever happened; the first error raised
                    try:
                        writer.close()
                    finally:
                        try:
                            sha.close()
                        finally:
                            sink.close()
                f.flush()
                os.fsync(f.fileno())
            got = Digest("sha256", hasher.hexdigest())
            if count != size:
                raise DigestMismatch(f"{source}: got {count} of {size} bytes of {expect}",
                                     fix="the transfer was cut short; try again (nothing was kept)")
            if got != expect:
                raise DigestMismatch(f"{source}: content is {got}, expected {expect} ({count} bytes)",
                                     fix="the source holds tampered or corrupt data; nothing was kept")
            os.replace(tmp, self.target)
            stat = os.stat(self.target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self.landed = True
        if self.tap is not None:
            self.tap.landed(got, count, stat)
        return got


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _open(path: Path) -> BinaryIO:
    return open(path, "rb")


def _empty() -> BinaryIO:
    from enclaver_rules.oci.referrers import EMPTY_JSON

    return io.BytesIO(EMPTY_JSON)
