"""Where an image comes from: one function that turns any image argument into a stored image.

For a registry reference: a digest-pinned reference is served from the store when it is there;
otherwise the local Docker engine if it has the image; otherwise the registry. When nobody has
it, one message says everywhere it looked and what each said (upstream only says "no such
image" when the image is not local).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci.engine import Engine, EngineUnavailable
from enclaver_rules.oci.model import Manifest, Platform
from enclaver_rules.oci.reference import (
    BadReference,
    DaemonImage,
    DockerArchiveImage,
    ImageLocation,
    OciLayoutImage,
    Reference,
    RegistryImage,
    parse_image,
)
from enclaver_rules.oci.registry import NotFound, Registry, RegistryUnavailable, is_local
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import (
    PLATFORM_ANNOTATION,
    NullReporter,
    Reporter,
    StoredImage,
    import_docker_archive,
    import_oci_layout,
    load_stored,
    pull,
)


@dataclass
class Sources:
    """What resolution may consult. Factories, so nothing connects until it is needed."""

    store: Store
    engine: Callable[[], Engine] = Engine
    insecure: frozenset[str] = frozenset()
    platform: Platform | None = None
    use_engine: bool = True
    reporter: Reporter = field(default_factory=NullReporter)
    _registries: dict[str, Registry] = field(default_factory=dict)

    def registry(self, host: str) -> Registry:
        if host not in self._registries:
            self._registries[host] = Registry(host, insecure=host in self.insecure)
        return self._registries[host]


def location(text: str) -> ImageLocation:
    try:
        return parse_image(text)
    except BadReference as e:
        raise InvalidInput(e.message, file="IMAGE", fix=e.fix) from None


def from_store(store: Store, ref: Reference, platform: Platform | None) -> StoredImage | None:
    """A digest-pinned reference already in the store (tags are mutable: never served from here)."""
    if ref.digest is None:
        return None
    descriptor = store.resolve(str(ref))
    if descriptor is not None:
        stored_platform = descriptor.annotation(PLATFORM_ANNOTATION)
        if platform is None or stored_platform in (None, str(platform)):
            return load_stored(store, str(ref), descriptor.digest, "store")
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


def resolve(text: str, sources: Sources) -> StoredImage:
    loc = location(text)
    store = sources.store.init()
    if isinstance(loc, OciLayoutImage):
        return import_oci_layout(loc.path, loc.tag, store, platform=sources.platform, reporter=sources.reporter)
    if isinstance(loc, DockerArchiveImage):
        path = Path(loc.path)
        if not path.is_file():
            raise InvalidInput(f"docker-archive:{loc.path}: no such file", file="IMAGE",
                               fix="create it with `docker save -o FILE IMAGE`")
        with open(path, "rb") as f:
            return import_docker_archive(f, store, str(loc), reporter=sources.reporter)
    if isinstance(loc, DaemonImage):
        engine = sources.engine()
        if not engine.has(loc.text):
            raise OperationFailed(f"{loc}: the Docker engine at {engine.host} has no such image",
                                  fix="build or pull it first, or name another source")
        return import_docker_archive(engine.save(loc.text), store, str(loc), reporter=sources.reporter)
    assert isinstance(loc, RegistryImage)
    return _resolve_registry(loc.ref, sources, store)


def _resolve_registry(ref: Reference, sources: Sources, store: Store) -> StoredImage:
    looked: list[str] = []
    stored = from_store(store, ref, sources.platform)
    if stored is not None:
        return stored
    if ref.digest:
        looked.append(f"the store at {store.root} (not there)")
    if sources.use_engine and ref.digest is None:
        try:
            engine = sources.engine()
            name = str(ref).removeprefix("docker.io/library/").removeprefix("docker.io/")
            if engine.has(name):
                return import_docker_archive(engine.save(name), store, f"docker-daemon:{name}", reporter=sources.reporter)
            looked.append(f"the Docker engine at {engine.host} (no such image)")
        except EngineUnavailable as e:
            looked.append(f"the Docker engine ({e.diagnostics[0].message})")
    try:
        return pull(ref, store, sources.registry(ref.api_host), platform=sources.platform, reporter=sources.reporter)
    except NotFound as e:
        looked.append(f"the registry {ref.registry} ({e.diagnostics[0].message.split(': ', 1)[-1]})")
    except RegistryUnavailable as e:
        looked.append(f"the registry {ref.registry} (unreachable: {e.diagnostics[0].message.split(': ', 2)[-1]})")
    hint = "" if is_local(ref.registry) or ref.registry in sources.insecure else \
        "; for a registry over plain HTTP add --insecure-registry"
    raise OperationFailed(f"image {ref} not found: looked in " + "; ".join(looked),
                          fix=f"check the name and tag, build or pull the image, or push it to the registry{hint}")
