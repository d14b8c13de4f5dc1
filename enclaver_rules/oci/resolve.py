"""Where an image comes from: one function that turns any image argument into a stored image.

For a registry reference: a digest-pinned reference is served from the store when it is there;
otherwise the local Docker engine if it has the image; otherwise the registry. When nobody has
it, one message says everywhere it looked and what each said (upstream only says "no such
image" when the image is not local).

Local things are looked at, and named in errors, before anything on the network: a typo in a
path says "no such file", a typo in a name "no such local image", with the registry's answer
as the second half of the message. A bare `myapp:latest` is a Docker Hub reference by Docker's
rules, so a typo in a local name used to surface as a DNS error for `registry-1.docker.io`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from enclaver_rules.errors import EnclaverError, InvalidInput, OperationFailed
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.engine import Engine, EngineUnavailable
from enclaver_rules.oci.model import ImageConfig, Index, Manifest, Platform
from enclaver_rules.oci.reference import (
    DOCKER_HUB,
    BadReference,
    DaemonImage,
    DockerArchiveImage,
    ImageLocation,
    OciLayoutImage,
    Reference,
    RegistryImage,
    parse_image,
)
from enclaver_rules.oci.stamps import Stamp, Stamps, stamp_of
from enclaver_rules.oci.store import CorruptBlob, Store
from enclaver_rules.oci.transfer import (
    DEFAULT_PLATFORM,
    INDEX_ANNOTATION,
    PLATFORM_ANNOTATION,
    NullReporter,
    Reporter,
    StoredImage,
    fetch_manifest,
    import_docker_archive,
    import_oci_layout,
    keep_once,
    load_stored,
    metadata,
    pull,
)

if TYPE_CHECKING:  # requests loads only when a registry is asked: a no-op build of local images needs none
    from enclaver_rules.oci.registry import Registry

log = logging.getLogger("enclaver.resolve")

#: Plain arguments that can only be paths (skopeo would need a transport; we say which).
_PATH_PREFIXES = ("/", "./", "../", "~/")
#: Names that are archives by their ending: Docker Hub has no such repositories worth guessing at.
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.xz")


@dataclass
class Sources:
    """What resolution may consult. Factories, so nothing connects until it is needed."""

    store: Store
    engine: Callable[[], Engine] = Engine
    insecure: frozenset[str] = frozenset()
    platform: Platform | None = None
    use_engine: bool = True
    reporter: Reporter = field(default_factory=NullReporter)
    #: What earlier resolutions found (the rule set's record beside `resolved.json`): a local source
    #: whose files still have their stamps is not read again, and a tag whose registry digest is
    #: unchanged (one HEAD) is served from the store's copy. None: look at everything again.
    stamps: Stamps | None = None
    _registries: dict[str, Registry] = field(default_factory=dict)

    def registry(self, host: str) -> Registry:
        from enclaver_rules.oci.registry import Registry

        if host not in self._registries:
            self._registries[host] = Registry(host, insecure=host in self.insecure)
        return self._registries[host]


# -- the argument ---------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    """A plain argument the user meant as a file: it starts like a path or ends like an archive.

    Only these: a bare `busybox` is an image even when a directory of that name is here.
    """
    if text in (".", "..", "~") or text.startswith(_PATH_PREFIXES):
        return True
    return "@" not in text and text.lower().endswith(_ARCHIVE_SUFFIXES)


def _where(path: str) -> str:
    """Where a relative path was looked for: the working directory is not always the obvious one
    (doit runs in the dodo.py's directory, not the manifest's)."""
    return "" if os.path.isabs(os.path.expanduser(path)) else f" (relative to {Path.cwd()})"


def _path_argument(text: str, file: str, field: str) -> InvalidInput:
    """The error for a plain argument that is a path: missing, or present but without a transport."""
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return InvalidInput(f"{text} is a file, not an image reference", file=file, field=field,
                            fix=f"for a `docker save` archive write docker-archive:{text}")
    if path.is_dir():
        return InvalidInput(f"{text} is a directory, not an image reference", file=file, field=field,
                            fix=f"for an OCI image layout write oci:{text}[:TAG]")
    what = "no such file" if text.lower().endswith(_ARCHIVE_SUFFIXES) else "no such file or directory"
    fix = "check the path; a `docker save` archive is docker-archive:PATH, an OCI layout oci:PATH[:TAG]"
    with suppress(BadReference):
        fix += f"; to mean the registry image {Reference.parse(text)} write docker://{text}"
    return InvalidInput(f"{what}: {text}{_where(text)}", file=file, field=field, fix=fix)


def _check_exists(loc: ImageLocation, file: str, field: str) -> None:
    """`oci:` and `docker-archive:` name local paths: a typo is "no such file", said before anything."""
    if isinstance(loc, OciLayoutImage):
        path = Path(loc.path)
        if path.is_file():
            raise InvalidInput(f"{loc}: {loc.path} is a file, not an OCI layout directory", file=file, field=field,
                               fix=f"for a `docker save` archive write docker-archive:{loc.path}")
        if not path.is_dir():
            raise InvalidInput(f"no such file or directory: {loc.path}{_where(loc.path)}", file=file, field=field,
                               fix="check the path; oci:PATH[:TAG] names an OCI image layout directory "
                                   "(as written by `skopeo copy … oci:PATH:TAG`)")
    elif isinstance(loc, DockerArchiveImage):
        path = Path(loc.path)
        if path.is_dir():
            raise InvalidInput(f"{loc}: {loc.path} is a directory, not a `docker save` archive", file=file,
                               field=field, fix=f"for an OCI image layout write oci:{loc.path}[:TAG]")
        if not path.is_file():
            raise InvalidInput(f"no such file: {loc.path}{_where(loc.path)}", file=file, field=field,
                               fix="check the path; create the archive with `docker save -o FILE IMAGE`")


def location(text: str, *, file: str = "IMAGE", field: str = "", source: bool = True) -> ImageLocation:
    """Parse an image argument. For a `source` (an image to read), a path that does not exist is
    refused here, before any network: `file` and `field` say where the argument was written."""
    if "://" not in text and not text.startswith(("oci:", "docker-archive:", "docker-daemon:")) \
            and _looks_like_path(text):
        if source:
            raise _path_argument(text, file, field)
        raise InvalidInput(f"{text} is a path, not an image reference", file=file, field=field,
                           fix=f"to write an OCI image layout give oci:{text}:TAG")
    try:
        loc = parse_image(text)
    except BadReference as e:
        raise InvalidInput(e.message, file=file, field=field, fix=e.fix) from None
    if source:
        _check_exists(loc, file, field)
    return loc


@contextmanager
def _located(file: str, field: str) -> Iterator[None]:
    """Every error while resolving an image from a manifest names the manifest and the field
    (`sources.app`), so the user knows which of several images failed."""
    if not field:
        yield
        return
    try:
        yield
    except EnclaverError as e:
        diagnostics = [d if d.field else dataclasses.replace(d, file=d.file if d.file not in ("", "IMAGE") else file,
                                                             field=field)
                       for d in e.diagnostics]
        raise type(e)(diagnostics=diagnostics) from e


# -- the store ----------------------------------------------------------------------------------


def from_store(store: Store, ref: Reference, platform: Platform | None) -> StoredImage | None:
    """A digest-pinned reference already in the store (tags are mutable: never served from here)."""
    if ref.digest is None:
        return None
    descriptor = store.resolve(str(ref))
    if descriptor is not None:
        stored_platform = descriptor.annotation(PLATFORM_ANNOTATION)
        if platform is None or stored_platform in (None, str(platform)):
            try:
                return load_stored(store, str(ref), descriptor.digest, "store")
            except CorruptBlob as e:  # quarantined now: say so, and fetch the image again from its registry
                log.warning("%s; fetching %s again", e, ref)
            except OperationFailed:
                pass  # a blob is missing (quarantined earlier): fetch the image again from its registry
    if store.has(ref.digest):
        try:
            node = store.manifest(ref.digest)
        except OperationFailed:
            return None
        if isinstance(node, Manifest):
            try:
                return load_stored(store, str(ref), ref.digest, "store")
            except OperationFailed:
                return None
    return None


def stored_tag(store: Store, ref: Reference, platform: Platform | None) -> StoredImage | None:
    """What the store holds under `ref` (a tag too), complete, for the platform asked for.

    For questions about an image (`image inspect`), not for builds: a build asks the engine and
    the registry for a tag, which may have moved since the store's copy was taken.
    """
    descriptor = store.resolve(str(ref))
    if descriptor is None:
        return None
    try:
        node = store.manifest(descriptor.digest, descriptor.media_type)
        if isinstance(node, Index):
            chosen = node.select(platform or DEFAULT_PLATFORM, str(ref))
            if not store.has(chosen.digest):
                return None
            image = load_stored(store, str(ref), chosen.digest, "store")
        else:
            image = load_stored(store, str(ref), descriptor.digest, "store")
    except OperationFailed:
        return None  # incomplete or not for this platform: the registry may have it
    if platform is not None and (image.config.platform.os, image.config.platform.architecture) != \
            (platform.os, platform.architecture):
        return None
    return image


# -- the engine ---------------------------------------------------------------------------------


def _engine_name(ref: Reference) -> str:
    """The engine's name for `ref`: Docker Hub's defaults left out, as `docker images` shows it."""
    return str(ref).removeprefix("docker.io/library/").removeprefix("docker.io/")


def _short_engine_failure(e: EngineUnavailable, host: str) -> str:
    """The common reasons in a few words; anything else as the SDK said it."""
    message = e.diagnostics[0].message
    if "No such file or directory" in message:
        return f"no Docker engine at {host}: no socket"
    if "Permission denied" in message:
        return f"no Docker engine at {host}: permission denied (join the docker group)"
    if "Connection refused" in message:
        return f"no Docker engine at {host}: connection refused"
    return message


@dataclass
class _EngineAnswer:
    """What the engine said about a name: it has it, it has not, or nobody answered (and why)."""

    engine: Engine
    has: bool = False
    unavailable: str = ""

    @property
    def host(self) -> str:
        return self.engine.host


def _ask_engine(ref: Reference, sources: Sources) -> _EngineAnswer:
    engine = sources.engine()
    try:
        return _EngineAnswer(engine, engine.has(_engine_name(ref)))
    except EngineUnavailable as e:
        return _EngineAnswer(engine, False, _short_engine_failure(e, engine.host))


def _from_engine(ref: Reference, sources: Sources, store: Store) -> tuple[StoredImage | None, _EngineAnswer | None]:
    """A tag the engine has, imported into the store; the engine is not asked for a digest or when
    `use_engine` is off (then the answer is None: nobody asked)."""
    if not sources.use_engine or ref.digest is not None:
        return None, None
    answer = _ask_engine(ref, sources)
    if not answer.has:
        return None, answer
    name = _engine_name(ref)
    return import_docker_archive(answer.engine.save(name), store.init(), f"docker-daemon:{name}",
                                 reporter=sources.reporter), answer


# -- the registry -------------------------------------------------------------------------------


def _no_dns(message: str) -> bool:
    return "NameResolutionError" in message or "Failed to resolve" in message or "Name or service not known" in message


def _short_network_failure(message: str, api_host: str) -> str:
    """requests' text for the usual reasons, in words; anything else as it was."""
    if _no_dns(message):
        return f"cannot resolve {api_host} (no DNS answer: offline, or a typo in the host?)"
    if "Connection refused" in message:
        return "connection refused"
    if "timed out" in message.lower() or "Timeout" in message:
        return "timed out"
    return message.removeprefix(f"{api_host}: ")


def _registry_said(ref: Reference, e: OperationFailed, hint: str) -> tuple[str, str]:
    """The registry's half of a "no such image" message, and the fix for a name nobody has."""
    from enclaver_rules.oci.registry import NotFound, RegistryUnavailable

    message = e.diagnostics[0].message
    http = re.search(r"HTTP \d{3}.*$", message)
    files = "a file is docker-archive:PATH, a layout oci:PATH[:TAG]"
    if isinstance(e, RegistryUnavailable):
        return (f"cannot be reached: {_short_network_failure(message, ref.api_host)}",
                f"check the name for a typo (an image built here must be in the Docker engine); {files}; "
                f"else check the network{hint}")
    if isinstance(e, NotFound):
        return (f"says not found: {http.group(0) if http else message}",
                f"check the name and tag for a typo; build or load the image into the Docker engine, or push it "
                f"to the registry; {files}")
    if http and http.group(0)[5:8] in ("401", "403"):
        return (f"refused: {http.group(0)}",
                f"check the name for a typo (a registry may refuse a repository that does not exist); if the image "
                f"is private, log in (`docker login {ref.registry}`)")
    return f"failed: {message.removeprefix(ref.api_host + ': ')}", f"check the name for a typo; {e.diagnostics[0].fix}"


def no_such_image(text: str, ref: Reference, sources: Sources, store: Store, engine: _EngineAnswer | None,
                  error: OperationFailed) -> OperationFailed:
    """The error for an image the registry did not give: the local lookup first, then the registry.

    Says what the store and the engine hold under that name, so a typo reads as a typo and a
    stored or engine copy is named with the argument that uses it.
    """
    from enclaver_rules.oci.registry import RegistryUnavailable, is_local

    if engine is None and ref.digest is None:
        engine = _ask_engine(ref, sources)  # not consulted (`image pull`): asked now, only to advise
    hint = ""
    if isinstance(error, RegistryUnavailable) and ref.registry != DOCKER_HUB and not is_local(ref.registry) \
            and ref.registry not in sources.insecure and not _no_dns(error.diagnostics[0].message):
        hint = f"; for a registry over plain HTTP add --insecure-registry {ref.registry}"
    registry, fix = _registry_said(ref, error, hint)
    if engine is not None and engine.has:
        return OperationFailed(
            f"image '{text}': the registry {ref.registry} {registry}; the Docker engine at {engine.host} has it, "
            "but `image pull` reads registries", fix=f"import it from the engine: docker-daemon:{_engine_name(ref)}")
    stored = store.resolve(str(ref)) if ref.digest is None else None
    if stored is not None:
        return OperationFailed(
            f"image '{text}': the registry {ref.registry} {registry}; enclaver's store has it as {stored.digest}, "
            "but a tag may have moved since, so a build uses that copy only when pinned",
            fix=f"to use the stored copy, pin it: {text.removeprefix('docker://')}@{stored.digest}")
    if engine is None:
        local = "not in enclaver's store; the engine is not asked for a digest"
    elif engine.unavailable:
        local = f"not in enclaver's store; {engine.unavailable}"
    else:
        local = "not in enclaver's store or the Docker engine"
    return OperationFailed(f"no such local image '{text}' ({local}), and the registry {ref.registry} {registry}",
                           fix=fix)


def registry_manifest(text: str, ref: Reference, sources: Sources, store: Store,
                      engine: _EngineAnswer | None) -> tuple[Manifest, Digest | None]:
    """The image manifest from the registry, or the "no such local image" error when it will not
    give one. Only the manifest lookup is translated: once the manifest is found the image exists,
    and a failed blob transfer is reported as it is."""
    try:
        return fetch_manifest(sources.registry(ref.api_host), ref, sources.platform)
    except DigestMismatch:
        raise
    except OperationFailed as e:
        raise no_such_image(text, ref, sources, store, engine, e) from None


# -- resolution ---------------------------------------------------------------------------------


def resolve(text: str, sources: Sources, *, file: str = "IMAGE", field: str = "") -> StoredImage:
    """The image `text` names, in the store. `file`/`field` say where `text` was written (a
    manifest and `sources.app`, say): every error then names them."""
    with _located(file, field):
        loc = location(text, file=file, field=field)
        store = sources.store.init()
        if isinstance(loc, OciLayoutImage):
            return _stamped(sources, store, f"oci:{os.path.abspath(loc.path)}:{loc.tag or ''}",
                            lambda read: import_oci_layout(loc.path, loc.tag, store, platform=sources.platform,
                                                           reporter=sources.reporter, read=read))
        if isinstance(loc, DockerArchiveImage):
            def archive(read: list[Stamp]) -> StoredImage:
                with open(loc.path, "rb") as f:
                    read.append(stamp_of(loc.path, os.fstat(f.fileno())))
                    return import_docker_archive(f, store, str(loc), reporter=sources.reporter)

            return _stamped(sources, store, f"docker-archive:{os.path.abspath(loc.path)}", archive)
        if isinstance(loc, DaemonImage):
            engine = sources.engine()
            if not engine.has(loc.text):
                raise OperationFailed(f"{loc}: the Docker engine at {engine.host} has no such image",
                                      fix="build or pull it first, or name another source")
            return import_docker_archive(engine.save(loc.text), store, str(loc), reporter=sources.reporter)
        assert isinstance(loc, RegistryImage)
        return _resolve_registry(text, loc.ref, sources, store)


def _stamped(sources: Sources, store: Store, key: str, load: Callable[[list[Stamp]], StoredImage]) -> StoredImage:
    """A local source (`load` imports it, appending the stamps of what it read), or, when
    `sources.stamps` has a result for `key` whose files are unchanged, the image the store keeps
    from the last import, without reading the source (`enclaver_rules.oci.stamps` says why)."""
    if sources.stamps is None:
        return load([])
    key = f"{key}@{sources.platform or ''}"
    known = sources.stamps.get(key)
    if known is not None:
        try:
            image = load_stored(store, known["name"], Digest.parse(known["digest"]), known["source"])
            # as an import leaves it: the manifest kept, the ref in place (nothing written when so)
            return keep_once(store, image.name, image.manifest, image.config, image.source, {})
        except (OperationFailed, KeyError, ValueError):
            pass  # collected or damaged in the store meanwhile: import it again
    read: list[Stamp] = []
    image = load(read)
    if read:  # nothing for a layout that is the store: it is read in place, as cheaply
        sources.stamps.put(key, read, {"name": image.name, "digest": str(image.digest), "source": image.source})
    return image


def _unmoved(text: str, ref: Reference, sources: Sources, store: Store,
             engine: _EngineAnswer | None) -> StoredImage | None:
    """With `sources.stamps`: the image tag `ref` gave the last time, from the store, when the
    registry still names the same digest for it (one HEAD); else None (moved, or not known)."""
    from enclaver_rules.oci.registry import RegistryUnavailable

    if sources.stamps is None:
        return None
    known = sources.stamps.get(_registry_key(ref, sources))
    if known is None:
        return None
    try:
        served = sources.registry(ref.api_host).head_manifest(ref.repository, ref.selector)
    except DigestMismatch:
        raise
    except RegistryUnavailable as e:  # what the GET would have said
        raise no_such_image(text, ref, sources, store, engine, e) from None
    except OperationFailed:
        return None  # no digest in the answer, refused, …: asked again with a GET
    try:
        if served is None or str(served) != known["pulled"]:
            return None  # moved (or gone): fetched as before
        image = load_stored(store, str(ref), Digest.parse(known["digest"]), f"registry {ref.name}")
        extra = {INDEX_ANNOTATION: known["pulled"]} if known["pulled"] != known["digest"] else {}
        # as `pull` leaves the store: the ref at this image (nothing written when it still is)
        return keep_once(store, str(ref), image.manifest, image.config, image.source, extra)
    except (OperationFailed, KeyError, ValueError):
        return None  # a blob collected or damaged meanwhile: pulled again


def _registry_key(ref: Reference, sources: Sources) -> str:
    return f"registry:{ref}@{sources.platform or ''}"


def _resolve_registry(text: str, ref: Reference, sources: Sources, store: Store) -> StoredImage:
    stored = from_store(store, ref, sources.platform)
    if stored is not None:
        return stored
    image, engine = _from_engine(ref, sources, store)
    if image is not None:
        return image
    unmoved = _unmoved(text, ref, sources, store, engine)
    if unmoved is not None:
        return unmoved
    found = registry_manifest(text, ref, sources, store, engine)
    image = pull(ref, store, sources.registry(ref.api_host), platform=sources.platform, reporter=sources.reporter,
                 found=found)
    if sources.stamps is not None and ref.digest is None:
        sources.stamps.put(_registry_key(ref, sources), [], {"pulled": str(found[1] or found[0].digest),
                                                             "digest": str(image.digest)})
    return image


@dataclass(frozen=True, slots=True)
class Described:
    """What `image inspect` shows: an image's manifest and config, wherever they were found."""

    name: str
    source: str
    manifest: Manifest
    config: ImageConfig
    index: Digest | None = None


def describe(text: str, sources: Sources) -> Described:
    """An image's manifest and config, looked up where a build would find it, local first.

    A reference the store holds (by tag too) is answered from the store with no network: this
    is a question about an image, not a build input. Else the engine; else the registry,
    without the layers.
    """
    loc = location(text)
    if not isinstance(loc, RegistryImage):
        image = resolve(text, sources)
        return Described(image.name, image.source, image.manifest, image.config)
    store = sources.store  # not created here: a registry image is read without it
    have = from_store(store, loc.ref, sources.platform) or stored_tag(store, loc.ref, sources.platform)
    engine = None
    if have is None:
        have, engine = _from_engine(loc.ref, sources, store)
    if have is not None:
        return Described(have.name, have.source, have.manifest, have.config)
    registry = sources.registry(loc.ref.api_host)
    found = registry_manifest(text, loc.ref, sources, store, engine)
    manifest, config, index = metadata(registry, loc.ref, sources.platform, found=found)
    return Described(str(loc.ref), f"registry {loc.ref.registry}", manifest, config, index)
