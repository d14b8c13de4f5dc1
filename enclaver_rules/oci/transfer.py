"""Moving images between the store and the outside: registries, OCI layouts, `docker save` tars.

Every path verifies what it takes in: registry blobs against their descriptors, layout blobs
against their names, archive layers against the config's diff_ids.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.model import Descriptor, ImageConfig, Index, Manifest, Platform, parse
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.reference import Reference
from enclaver_rules.oci.stamps import RACY_NS, Stamp, stamp, stamp_of
from enclaver_rules.oci.store import CHUNK, REF_ANNOTATION, Progress, Store

if TYPE_CHECKING:  # requests loads only where a registry is used: a no-op build of local images needs none
    from enclaver_rules.oci.registry import Registry

SOURCE_ANNOTATION = "io.enclaver.source"
PLATFORM_ANNOTATION = "io.enclaver.platform"
INDEX_ANNOTATION = "io.enclaver.index"
DEFAULT_PLATFORM = Platform("linux", "amd64")
#: Blobs in flight at once (skopeo uses 6; two cores gain little beyond 4).
TRANSFER_WORKERS = 4
_SMALL = 1 << 20  # archive metadata kept in memory is at most this big
_ARCHIVE_METADATA = frozenset({"manifest.json", "repositories", "index.json", "oci-layout"})


class Reporter(Protocol):
    """Progress for long transfers; the CLI draws it, library code only reports."""

    def task(self, description: str, total: int | None) -> Progress: ...

    def done(self, description: str) -> None: ...


class NullReporter:
    def task(self, description: str, total: int | None) -> Progress:
        return lambda n: None

    def done(self, description: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image whose manifest, config and layers are all in the store."""

    name: str  # the store ref
    manifest: Manifest
    config: ImageConfig
    source: str

    @property
    def digest(self) -> Digest:
        return self.manifest.digest

    @property
    def size(self) -> int:
        return len(self.manifest.raw) + self.manifest.config.size + sum(d.size for d in self.manifest.layers)


def load_stored(store: Store, name: str, digest: Digest, source: str = "") -> StoredImage:
    node = store.manifest(digest)
    if not isinstance(node, Manifest):
        raise OperationFailed(f"{name}: {digest.short} in the store is an index, not an image", fix="a bug: report it")
    missing = [d.digest.short for d in (node.config, *node.layers) if not store.has(d.digest)]
    if missing:
        raise OperationFailed(f"{name}: blobs missing from the store: {', '.join(missing)}",
                              fix="pull the image again")
    config = ImageConfig.parse(store.read(node.config.digest), f"{name} config")
    return StoredImage(name, node, config, source)


#: index.json as last parsed in this process, per store, with the stamp it had (see `index_entries`).
_INDEXES: dict[Path, tuple[Stamp, list[dict[str, Any]]]] = {}


def index_entries(store: Store) -> list[dict[str, Any]]:
    """The store's refs as `index.json` lists them, parsed again only when the file changed: a no-op
    build asks once or twice per enclave, and the file lists every enclave's images. The stamp is
    taken before the read, and a file changed in the last `RACY_NS` is always read (see `stamps`).
    Read-only: the list is shared."""
    path = store.root / "index.json"
    now = stamp(path)
    cached = _INDEXES.get(path)
    if cached is not None and cached[0] == now:
        return cached[1]
    entries = store._read_index()
    if len(now) > 1 and now[5] <= time.time_ns() - RACY_NS:
        _INDEXES[path] = (now, entries)
    return entries


def find_ref(store: Store, name: str) -> Descriptor | None:
    """`store.resolve(name)` (the last entry of that name), from `index_entries`, parsing that entry
    only."""
    found = None
    for entry in index_entries(store):
        if isinstance(entry, dict) and (entry.get("annotations") or {}).get(REF_ANNOTATION) == name:
            found = entry
    return None if found is None else Descriptor.from_json(found, f"{store.root}/index.json")


def keep(store: Store, name: str, manifest: Manifest, config: ImageConfig, source: str,
         annotations: dict[str, str]) -> StoredImage:
    """The manifest into the store (its config and layers are there) and `name` tagged at it."""
    store.put_bytes(manifest.raw, expect=manifest.digest, source=f"{source} manifest")
    store.tag(name, manifest.descriptor({SOURCE_ANNOTATION: source, PLATFORM_ANNOTATION: str(config.platform),
                                         **annotations}))
    return StoredImage(name, manifest, config, source)


def keep_once(store: Store, name: str, manifest: Manifest, config: ImageConfig, source: str,
              annotations: dict[str, str]) -> StoredImage:
    """`keep`, when it would change something: the manifest missing, or ref `name` not already at
    this exact descriptor (what `Store.tag` compares); else nothing is written or locked."""
    entry = manifest.descriptor({SOURCE_ANNOTATION: source, PLATFORM_ANNOTATION: str(config.platform),
                                 **annotations}).to_json()
    entry["annotations"] = {**entry.get("annotations", {}), REF_ANNOTATION: name}
    if store.has(manifest.digest) and entry in index_entries(store):
        return StoredImage(name, manifest, config, source)
    return keep(store, name, manifest, config, source, annotations)


def _check_platform(config: ImageConfig, platform: Platform | None, where: str) -> None:
    if platform is not None and (config.platform.os, config.platform.architecture) != (platform.os, platform.architecture):
        raise OperationFailed(f"{where} is a {config.platform} image, not {platform}",
                              fix=f"use an image built for {platform}, or pass --platform {config.platform}")


def _fetch_all(registry: Registry, repository: str, manifest: Manifest, store: Store, reporter: Reporter,
               label: str) -> ImageConfig:
    registry.fetch_blob(repository, manifest.config, store)
    config = ImageConfig.parse(store.read(manifest.config.digest), f"{label} config")
    if len(config.diff_ids) != len(manifest.layers):
        raise OperationFailed(f"{label}: {len(manifest.layers)} layers but {len(config.diff_ids)} diff_ids",
                              fix="the image is corrupt")
    progress = reporter.task(f"pull {label}", sum(d.size for d in manifest.layers))
    parallel([lambda d=d: registry.fetch_blob(repository, d, store, progress) for d in manifest.layers])  # type: ignore[misc]
    reporter.done(f"pull {label}")
    return config


def parallel(jobs: list[Callable[[], object]], workers: int = TRANSFER_WORKERS) -> None:
    """Run transfer jobs a few at a time; the first failure cancels the rest and is raised.

    Each job streams in bounded chunks, so memory stays bounded by workers × chunk size.
    """
    if len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="transfer") as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def fetch_manifest(registry: Registry, ref: Reference, platform: Platform | None) -> tuple[Manifest, Digest | None]:
    """The image manifest for `ref` (choosing `platform` from an index) and the index digest, if any."""
    raw, media_type = registry.get_manifest(ref.repository, ref.selector)
    node = parse(raw, media_type, str(ref))
    index_digest = None
    if isinstance(node, Index):
        index_digest = node.digest
        chosen = node.select(platform or DEFAULT_PLATFORM, str(ref))
        raw, media_type = registry.get_manifest(ref.repository, str(chosen.digest))
        node = parse(raw, media_type or chosen.media_type, f"{ref} ({chosen.platform})")
        if not isinstance(node, Manifest):
            raise OperationFailed(f"{ref}: the index points at another index", fix="nested indexes are not supported")
    return node, index_digest


def pull(ref: Reference, store: Store, registry: Registry, *, platform: Platform | None = None,
         reporter: Reporter | None = None, found: tuple[Manifest, Digest | None] | None = None) -> StoredImage:
    """Registry → store: every blob verified; the store ref is the reference as given.

    `found` is what `fetch_manifest` already returned, for a caller that looks the manifest up
    first to tell "no such image" (the lookup failed) from a failed transfer of one that exists.
    """
    reporter = reporter or NullReporter()
    manifest, index_digest = found or fetch_manifest(registry, ref, platform)
    config = _fetch_all(registry, ref.repository, manifest, store, reporter, str(ref))
    _check_platform(config, platform, str(ref))
    extra = {INDEX_ANNOTATION: str(index_digest)} if index_digest else {}
    return keep(store, str(ref), manifest, config, f"registry {ref.name}", extra)


def push(image: StoredImage, store: Store, dest: Reference, registry: Registry, *,
         mount_from: str | None = None, reporter: Reporter | None = None) -> Digest:
    """Store → registry: blobs first (skipped when present, mounted when possible), manifest last."""
    reporter = reporter or NullReporter()
    if dest.digest and dest.digest != image.digest:
        raise OperationFailed(f"{dest}: the image is {image.digest}, not the digest in the destination",
                              fix="drop @digest from the destination, or push the image it names")
    progress = reporter.task(f"push {dest}", image.size - len(image.manifest.raw))
    parallel([lambda d=d: registry.push_blob(dest.repository, d, lambda: store.open(d.digest),  # type: ignore[misc]
                                              mount_from=mount_from, progress=progress)
              for d in (image.manifest.config, *image.manifest.layers)])
    digest = registry.put_manifest(dest.repository, dest.tag or str(image.digest), image.manifest.raw,
                                   image.manifest.media_type)
    reporter.done(f"push {dest}")
    return digest


def metadata(registry: Registry, ref: Reference, platform: Platform | None, *,
             found: tuple[Manifest, Digest | None] | None = None) -> tuple[Manifest, ImageConfig, Digest | None]:
    """Manifest and config only (no layers): what `image inspect` needs from a registry
    (`found`: the manifest lookup already done, as for `pull`)."""
    manifest, index_digest = found or fetch_manifest(registry, ref, platform)
    response = registry.request("GET", registry.url(ref.repository, f"blobs/{manifest.config.digest}"), ref.repository,
                                what=f"config {manifest.config.digest.short}")
    raw = response.content
    if Digest.of(raw) != manifest.config.digest:
        raise DigestMismatch(f"{registry.host}: config of {ref} is not {manifest.config.digest}",
                             fix="the registry serves tampered or corrupt data")
    return manifest, ImageConfig.parse(raw, f"{ref} config"), index_digest


# -- OCI layouts (oci:PATH[:TAG]) ---------------------------------------------------------------


def import_oci_layout(path: str, tag: str | None, store: Store, *, platform: Platform | None = None,
                      reporter: Reporter | None = None, read: list[Stamp] | None = None) -> StoredImage:
    """Copy an image out of another OCI layout, verifying every blob against its name.

    The copy is tagged `imported@<digest>`: nothing else names it in the store, and an image
    no ref reaches is deleted by `enclaver cache gc` (a build reads it again by digest later).
    When the layout *is* the store (`oci:cache:REF`, as skopeo names an image in it), the image
    is already there under its own ref: nothing is copied and no second ref is added.
    `read`: the stamps of the files read (`index.json` and every blob copied) are appended to it,
    each taken before the file was read (see `stamps`); nothing is appended for the store itself.
    """
    layout = Store(path, quarantine=False)  # the user's layout: report a damaged blob, never move it
    if not Path(path).is_dir():
        raise OperationFailed(f"oci:{path}: no such directory", fix="give the directory of an OCI layout")
    if not (Path(path) / "index.json").is_file():
        raise OperationFailed(f"oci:{path}: no index.json: not an OCI layout", fix="give the directory of an OCI layout")
    seen: list[Stamp] = [stamp(Path(path) / "index.json")]
    entries = layout._read_index()
    if tag:
        name = tag if layout.resolve(tag) is not None else _normalised(tag)
        chosen = layout.resolve(name)
        if chosen is None:
            raise OperationFailed(f"oci:{path}: no image tagged {tag!r}",
                                  fix=f"tags in it: {', '.join(sorted(layout.refs())) or 'none'}")
    elif len(entries) == 1:
        chosen = Descriptor.from_json(entries[0], f"oci:{path}/index.json")
        name = chosen.annotation(REF_ANNOTATION) or ""
    else:
        raise OperationFailed(f"oci:{path} holds {len(entries)} images", fix="name one: oci:PATH:TAG")
    label = f"oci:{path}" + (f":{tag}" if tag else "")
    if _same_directory(path, store.root):
        return _from_own_store(store, name or f"imported@{chosen.digest}", chosen, label, platform)

    def copy(descriptor: Descriptor, progress: Progress | None = None) -> bytes | None:
        with layout.open(descriptor.digest) as f:
            seen.append(stamp_of(layout.path(descriptor.digest), os.fstat(f.fileno())))
            store.put_stream(f, descriptor.digest, descriptor.size, source=label, progress=progress)
        return None

    copy(chosen)
    node = store.manifest(chosen.digest, chosen.media_type)
    if isinstance(node, Index):
        inner = node.select(platform or DEFAULT_PLATFORM, label)
        copy(inner)
        node = store.manifest(inner.digest, inner.media_type)
    if not isinstance(node, Manifest):
        raise OperationFailed(f"{label}: nested indexes are not supported", fix="point at an image")
    copy(node.config)
    progress = (reporter or NullReporter()).task(f"import {label}", sum(d.size for d in node.layers))
    for layer in node.layers:
        copy(layer, progress)
    config = ImageConfig.parse(store.read(node.config.digest), f"{label} config")
    _check_platform(config, platform, label)
    image = keep(store, f"imported@{node.digest}", node, config, label, {})
    if read is not None:
        read.extend(seen)
    return image


def _normalised(tag: str) -> str:
    """The store names images by full reference (`docker.io/library/app:1`): `app:1` finds it too."""
    try:
        return str(Reference.parse(tag))
    except ValueError:
        return tag


def _same_directory(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _from_own_store(store: Store, name: str, chosen: Descriptor, label: str, platform: Platform | None) -> StoredImage:
    """An image `oci:<store>:REF` names: read in place, checked complete, with no ref added."""
    node = store.manifest(chosen.digest, chosen.media_type)
    digest = chosen.digest
    if isinstance(node, Index):
        digest = node.select(platform or DEFAULT_PLATFORM, label).digest
    image = load_stored(store, name, digest, label)
    _check_platform(image.config, platform, label)
    return image


# -- docker save archives (docker-archive:PATH, and the engine's save stream) --------------------


def import_docker_archive(stream: BinaryIO, store: Store, source: str, *, reporter: Reporter | None = None) -> StoredImage:
    """Stream a `docker save` tar (legacy or OCI-style) into the store, one member at a time.

    Layers are kept as the engine wrote them (uncompressed tars, digest = diff_id, which is
    checked against the config); small JSON members are held in memory to build the manifest.
    """
    progress = (reporter or NullReporter()).task(f"import {source}", None)
    blobs: dict[str, tuple[Digest, int]] = {}
    small: dict[str, bytes] = {}
    links: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.issym() or member.islnk():
                    base = name.rsplit("/", 1)[0] if member.issym() and "/" in name else ""
                    target = member.linkname if member.islnk() else _join(base, member.linkname)
                    links[name] = target.removeprefix("./")
                elif member.isfile():
                    data = tar.extractfile(member)
                    assert data is not None
                    if name in _ARCHIVE_METADATA and member.size <= _SMALL:
                        small[name] = data.read()
                        continue
                    digest = store.put_stream(data, size=member.size, source=f"{source}: {name}", progress=progress)
                    blobs[name] = (digest, member.size)
    except (tarfile.TarError, EOFError) as e:
        raise OperationFailed(f"{source}: not a docker save archive: {e}", fix="create it with `docker save -o FILE IMAGE`") from None

    def blob(name: str) -> tuple[Digest, int]:
        seen = 0
        while name in links and seen < 16:
            name, seen = links[name], seen + 1
        if name not in blobs:
            raise OperationFailed(f"{source}: {name!r} is missing from the archive", fix="the archive is incomplete")
        return blobs[name]

    try:
        entries = json.loads(small["manifest.json"])
        entry = entries[0]
        config_name = entry["Config"]
        layer_names = list(entry["Layers"])
        tags = entry.get("RepoTags") or []
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise OperationFailed(f"{source}: no usable manifest.json ({e})", fix="create it with `docker save -o FILE IMAGE`") from None
    if len(entries) > 1:
        raise OperationFailed(f"{source} holds {len(entries)} images", fix="save one image per archive")
    config_digest, config_size = blob(config_name)
    config = ImageConfig.parse(store.read(config_digest), f"{source} config")
    layers = []
    for name, diff_id in zip(layer_names, config.diff_ids, strict=False):
        digest, size = blob(name)
        with store.open(digest) as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped and digest != diff_id:
            raise DigestMismatch(f"{source}: layer {name} is {digest}, but the config says {diff_id}",
                                 fix="the archive is corrupt or was tampered with")
        layers.append({"mediaType": mt.OCI_LAYER_GZIP if gzipped else mt.OCI_LAYER, "digest": str(digest), "size": size})
    if len(layers) != len(config.diff_ids) or len(layer_names) != len(config.diff_ids):
        raise OperationFailed(f"{source}: {len(layer_names)} layers but {len(config.diff_ids)} diff_ids",
                              fix="the archive is corrupt")
    raw = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                          "config": {"mediaType": mt.OCI_CONFIG, "digest": str(config_digest), "size": config_size},
                          "layers": layers})
    node = parse(raw, mt.OCI_MANIFEST, source)
    assert isinstance(node, Manifest)
    name = _archive_name(tags, node.digest)
    return keep(store, name, node, config, source, {})


def _join(base: str, link: str) -> str:
    parts = [p for p in (base.split("/") if base else []) if p]
    for p in link.split("/"):
        if p == "..":
            if parts:
                parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    return "/".join(parts)


def _archive_name(tags: list[str], digest: Digest) -> str:
    for tag in tags:
        try:
            return str(Reference.parse(tag))
        except ValueError:
            continue
    return f"imported@{digest}"


def docker_archive(image: StoredImage, store: Store, repo_tag: str | None) -> Iterator[bytes]:
    """A `docker load` tar of a stored image, generated on the fly (layers streamed from the store).

    The legacy layout (`manifest.json`, `<id>.json`, `<digest>/layer.tar`) is what every engine
    loads; compressed layers are fine there, the engine inflates them.
    """
    config_name = f"{image.manifest.config.digest.hex}.json"
    layer_names = [f"{d.digest.hex}/layer.tar" for d in image.manifest.layers]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [repo_tag] if repo_tag else [],
                            "Layers": layer_names}]).encode()

    def member(name: str, size: int, chunks: Callable[[], Iterator[bytes]]) -> Iterator[bytes]:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        yield info.tobuf(tarfile.PAX_FORMAT)
        yield from chunks()
        if size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)

    def from_store(digest: Digest) -> Callable[[], Iterator[bytes]]:
        def read() -> Iterator[bytes]:
            with store.open(digest) as f:
                yield from iter(lambda: f.read(CHUNK), b"")
        return read

    yield from member(config_name, image.manifest.config.size, from_store(image.manifest.config.digest))
    for name, descriptor in zip(layer_names, image.manifest.layers, strict=True):
        yield from member(name, descriptor.size, from_store(descriptor.digest))
    yield from member("manifest.json", len(manifest), lambda: iter([manifest]))
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
