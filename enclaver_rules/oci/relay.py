"""Registry → registry copy of one image, blobs streamed from the source's GET into the
destination's PUT, as `skopeo copy` does: no store in between, one read and one hash per byte.

Why not pull then push: that writes every blob to the store (and fsyncs it), reads it back and
hashes it a second time on the way out. Here each blob is hashed once, as it passes, and held to
its descriptor's digest and size like a pull: the last chunk is withheld until the whole blob has
verified, so a destination never receives a complete body that does not match (and it checks
`?digest=` itself). A blob the store already keeps goes out from the store (verified as it is
read; a rotted one raises `CorruptBlob`, as a push from the store does), and one the destination
has, or can mount from the source repository on the same host, is not sent at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.model import Descriptor, ImageConfig, Manifest, Platform
from enclaver_rules.oci.reference import Reference
from enclaver_rules.oci.registry import TRANSFER_ERRORS, PushResult, Registry, RegistryUnavailable, Response
from enclaver_rules.oci.store import CHUNK, Progress, Store
from enclaver_rules.oci.transfer import NullReporter, Reporter, fetch_manifest, parallel

#: A config larger than this is not an image config (they are kilobytes); refused before reading it.
MAX_CONFIG_BYTES = 16 << 20


class RelayBody:
    """A PUT body: the source's GET response, streamed in `CHUNK`s, counted, held to the declared
    size and hashed as it passes. Sized (so requests sends Content-Length) and one-shot: it cannot
    be replayed, so a second send fails loudly instead of sending nothing."""

    def __init__(self, response: Response, descriptor: Descriptor, source: str,
                 progress: Progress | None) -> None:
        self.response, self.descriptor, self.source, self.progress = response, descriptor, source, progress
        self.sent = False

    def __len__(self) -> int:
        return self.descriptor.size

    def __iter__(self) -> Iterator[bytes]:
        if self.sent:
            raise OperationFailed(f"{self.source}: the upload was refused after its body was sent",
                                  fix="try again; nothing was kept")
        self.sent = True
        expect, size = self.descriptor.digest, self.descriptor.size
        hasher = hashlib.sha256()
        count = 0
        held = b""
        try:
            for chunk in self.response.iter_content(CHUNK):
                count += len(chunk)
                if count > size:
                    raise DigestMismatch(f"{self.source}: more than the declared {size} bytes",
                                         fix="the source registry serves tampered or corrupt data; nothing was kept")
                hasher.update(chunk)
                if held:
                    yield held
                    if self.progress:
                        self.progress(len(held))
                held = chunk
        except TRANSFER_ERRORS as e:
            raise RegistryUnavailable(f"{self.source}: transfer failed: {e}", fix="try again; nothing was kept") from None
        if count != size:
            raise DigestMismatch(f"{self.source}: got {count} of {size} bytes",
                                 fix="the transfer was cut short; try again (nothing was kept)")
        if hasher.hexdigest() != expect.hex:
            raise DigestMismatch(f"{self.source}: content is sha256:{hasher.hexdigest()}, expected {expect}",
                                 fix="the source registry serves tampered or corrupt data; nothing was kept")
        if held:  # verified: only now may the destination have the whole body
            yield held
            if self.progress:
                self.progress(len(held))


def relay_blob(src: Registry, src_repository: str, dst: Registry, dst_repository: str, descriptor: Descriptor,
               store: Store, progress: Progress | None = None) -> PushResult:
    """One blob to `dst`: skipped when there, mounted when it can be, else sent from the store
    (when it keeps it) or streamed from `src`."""
    if descriptor.digest.algorithm != "sha256":
        raise OperationFailed(f"{src.host}/{src_repository}: blob {descriptor.digest} is not sha256",
                              fix="only sha256 blobs are copied")
    mount_from = src_repository if src.host == dst.host else None
    if store.has(descriptor.digest):
        return dst.push_blob(dst_repository, descriptor, lambda: store.open(descriptor.digest), mount_from, progress)
    started = dst.start_upload(dst_repository, descriptor, mount_from, progress)
    if isinstance(started, PushResult):
        return started
    source = f"{src.host}/{src_repository} blob {descriptor.digest.short}"
    response = src.request("GET", src.url(src_repository, f"blobs/{descriptor.digest}"), src_repository,
                           stream=True, what=f"blob {descriptor.digest.short}")
    with response:
        dst.finish_upload(dst_repository, descriptor, started, RelayBody(response, descriptor, source, progress))
    return PushResult(descriptor.digest, "uploaded")


def fetch_config(registry: Registry, repository: str, manifest: Manifest, label: str) -> tuple[bytes, ImageConfig]:
    """The config's bytes, read whole (bounded by its declared size) and verified."""
    descriptor = manifest.config
    if descriptor.size > MAX_CONFIG_BYTES:
        raise OperationFailed(f"{label}: the config is {descriptor.size} bytes", fix="this is not an image config")
    response = registry.request("GET", registry.url(repository, f"blobs/{descriptor.digest}"), repository,
                                stream=True, what=f"config {descriptor.digest.short}")
    with response:
        try:
            raw = response.raw.read(descriptor.size + 1, decode_content=True)
        except TRANSFER_ERRORS as e:  # the transfer failed, not the content
            raise RegistryUnavailable(f"{registry.host}: config of {label}: transfer failed: {e}",
                                      fix="try again") from None
    if len(raw) != descriptor.size or Digest.of(raw) != descriptor.digest:
        raise DigestMismatch(f"{registry.host}: config of {label} is not {descriptor.digest} ({len(raw)} bytes)",
                             fix="the registry serves tampered or corrupt data; do not use it")
    return raw, ImageConfig.parse(raw, f"{label} config")


def copy_image(src: Registry, ref: Reference, dst: Registry, dest: Reference, store: Store, *,
               platform: Platform | None = None, reporter: Reporter | None = None,
               found: Manifest | None = None) -> Digest:
    """`ref` on `src` to `dest` on `dst`: the manifest (verified; from an index, the one for
    `platform`; `found`: already fetched), its config and layers (each verified as it streams),
    the manifest last."""
    reporter = reporter or NullReporter()
    manifest = found or fetch_manifest(src, ref, platform)[0]
    label = str(ref)
    if dest.digest and dest.digest != manifest.digest:
        raise OperationFailed(f"{dest}: the image is {manifest.digest}, not the digest in the destination",
                              fix="drop @digest from the destination, or push the image it names")
    if store.has(manifest.config.digest):  # verified as read: a rotted copy raises CorruptBlob, as a push does
        raw = store.read(manifest.config.digest)
        config = ImageConfig.parse(raw, f"{label} config")
    else:
        raw, config = fetch_config(src, ref.repository, manifest, label)
    if len(config.diff_ids) != len(manifest.layers):
        raise OperationFailed(f"{label}: {len(manifest.layers)} layers but {len(config.diff_ids)} diff_ids",
                              fix="the image is corrupt")
    if platform is not None and (config.platform.os, config.platform.architecture) != \
            (platform.os, platform.architecture):
        raise OperationFailed(f"{label} is a {config.platform} image, not {platform}",
                              fix=f"use an image built for {platform}, or pass --platform {config.platform}")
    progress = reporter.task(f"push {dest}", sum(d.size for d in manifest.layers))

    mount_from = ref.repository if src.host == dst.host else None
    jobs: list[Callable[[], object]] = [lambda: _push_bytes(dst, dest.repository, manifest.config, raw, mount_from)]
    jobs += [lambda d=d: relay_blob(src, ref.repository, dst, dest.repository, d, store, progress)  # type: ignore[misc]
             for d in manifest.layers]
    parallel(jobs)
    digest = dst.put_manifest(dest.repository, dest.tag or str(manifest.digest), manifest.raw, manifest.media_type)
    reporter.done(f"push {dest}")
    return digest


def _push_bytes(dst: Registry, repository: str, descriptor: Descriptor, raw: bytes, mount_from: str | None) -> None:
    started = dst.start_upload(repository, descriptor, mount_from)
    if not isinstance(started, PushResult):
        dst.finish_upload(repository, descriptor, started, raw)
