"""Typos in image arguments: "no such file" / "no such local image" first, never a bare network error.

Issue 14 §3: a path typo used to become a DNS error for `registry-1.docker.io`, a store tag was
inspected over the network, and `oci:<store>:REF` added a spurious `imported@` ref. Nothing here
needs the network, dockerd or a registry: the engine is a fake, the registry a monkeypatched
client (or a port nobody listens on), so every test is deterministic offline and online.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from enclaver_rules.errors import EnclaverError, InvalidInput, OperationFailed
from enclaver_rules.oci import registry as registry_module
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.engine import EngineUnavailable
from enclaver_rules.oci.layer import Entry
from enclaver_rules.oci.registry import NotFound, RegistryUnavailable
from enclaver_rules.oci.resolve import Sources, resolve
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import docker_archive, load_stored
from oci_helpers import make_layout

#: What requests says when DNS has no answer (the text a user saw for a typo before).
DNS_FAILURE = ("registry-1.docker.io: manifest library/myapp:latest failed: ConnectionError: "
               "HTTPSConnectionPool(host='registry-1.docker.io', port=443): Max retries exceeded with url: "
               "/v2/library/myapp/manifests/latest (Caused by NameResolutionError(\"HTTPSConnection(host="
               "'registry-1.docker.io', port=443): Failed to resolve 'registry-1.docker.io' ([Errno -2] Name or "
               "service not known)\"))")


class FakeEngine:
    """The engine adapter's narrow surface (host, has, save) over a few stored images."""

    host = "unix:///fake/docker.sock"

    def __init__(self, images: dict[str, bytes] | None = None) -> None:
        self.images = images or {}
        self.asked: list[str] = []

    def has(self, name: str) -> bool:
        self.asked.append(name)
        return name in self.images

    def save(self, name: str) -> BinaryIO:
        return io.BytesIO(self.images[name])


class DeadEngine:
    host = "unix:///nowhere/docker.sock"

    def has(self, name: str) -> bool:
        raise EngineUnavailable(f"no Docker engine at {self.host}: DockerException: Error while fetching server API "
                                "version: ('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))",
                                fix="start Docker")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every registry manifest request fails as DNS does offline; returns what was asked for."""
    asked: list[str] = []

    def get_manifest(self: Any, repository: str, selector: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(f"{self.host}/{repository}:{selector}")
        raise RegistryUnavailable(DNS_FAILURE, fix="check the registry address and that it is up")

    monkeypatch.setattr(registry_module.Registry, "get_manifest", get_manifest)
    monkeypatch.setattr(registry_module.Registry, "request", lambda *a, **k: pytest.fail("no network expected"))
    return asked


@pytest.fixture
def absent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every registry answers 404 for every manifest."""
    def get_manifest(self: Any, repository: str, selector: str, *args: Any, **kwargs: Any) -> Any:
        raise NotFound(f"{self.host}: manifest {repository}:{selector}: HTTP 404 (MANIFEST_UNKNOWN: manifest unknown)",
                       fix="check the repository, tag and digest")

    monkeypatch.setattr(registry_module.Registry, "get_manifest", get_manifest)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any registry call fails the test: the answer must come from local files."""
    for name in ("get_manifest", "request", "fetch_blob"):
        monkeypatch.setattr(registry_module.Registry, name, lambda *a, **k: pytest.fail("the registry was asked"))


def sources(tmp_path: Path, engine: Callable[[], Any] | None = None, **kwargs: Any) -> Sources:
    return Sources(Store(tmp_path / "store"), engine=engine or FakeEngine, **kwargs)  # type: ignore[arg-type]


def only(error: EnclaverError) -> str:
    [diagnostic] = error.diagnostics
    return str(diagnostic)


# -- path typos ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, says", [
    ("oci:./does-not-exist", "no such file or directory: ./does-not-exist"),
    ("oci:./does-not-exist:v1", "no such file or directory: ./does-not-exist"),
    ("docker-archive:missing.tar", "no such file: missing.tar"),
    ("./app.tar", "no such file: ./app.tar"),
    ("app.tar", "no such file: app.tar"),
    ("images/app.tar.gz", "no such file: images/app.tar.gz"),
    ("../layout", "no such file or directory: ../layout"),
])
def test_a_path_typo_says_no_such_file_and_never_asks_a_registry(
        text: str, says: str, tmp_path: Path, in_tmp: Path, no_network: None) -> None:
    with pytest.raises(InvalidInput) as e:
        resolve(text, sources(tmp_path))
    message = only(e.value)
    assert says in message, message
    assert f"relative to {in_tmp}" in message
    assert "registry" not in message.split(" — ")[0]


def test_an_absolute_path_typo_says_no_such_file(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(InvalidInput, match=f"no such file: {tmp_path}/app.tar"):
        resolve(f"{tmp_path}/app.tar", sources(tmp_path))


def test_a_bare_archive_name_may_still_mean_the_registry_through_docker_scheme(tmp_path: Path, in_tmp: Path,
                                                                                no_network: None) -> None:
    with pytest.raises(InvalidInput) as e:
        resolve("app.tar", sources(tmp_path))
    assert "docker://app.tar" in e.value.diagnostics[0].fix  # the way to mean the registry image of that name
    assert "docker-archive:PATH" in e.value.diagnostics[0].fix


def test_an_existing_file_or_directory_is_pointed_at_its_transport(tmp_path: Path, in_tmp: Path,
                                                                   no_network: None) -> None:
    (in_tmp / "app.tar").write_bytes(b"")
    (in_tmp / "layout").mkdir()
    with pytest.raises(InvalidInput) as e:
        resolve("./app.tar", sources(tmp_path))
    assert "docker-archive:./app.tar" in only(e.value)
    with pytest.raises(InvalidInput) as e:
        resolve("./layout", sources(tmp_path))
    assert "oci:./layout" in only(e.value)
    with pytest.raises(InvalidInput) as e:
        resolve("docker-archive:layout", sources(tmp_path))
    assert "is a directory" in only(e.value) and "oci:layout" in only(e.value)
    with pytest.raises(InvalidInput) as e:
        resolve("oci:app.tar", sources(tmp_path))
    assert "is a file" in only(e.value) and "docker-archive:app.tar" in only(e.value)


def test_an_error_from_a_manifest_names_the_file_and_field(tmp_path: Path, in_tmp: Path, offline: list[str]) -> None:
    with pytest.raises(InvalidInput) as e:
        resolve("./app.tar", sources(tmp_path), file="enclaver.yaml", field="sources.app")
    assert only(e.value).startswith("enclaver.yaml: sources.app: no such file: ./app.tar")
    with pytest.raises(OperationFailed) as f:
        resolve("myapp:latest", sources(tmp_path), file="enclaver.yaml", field="sources.sleeve")
    assert str(f.value).startswith("enclaver.yaml: sources.sleeve: no such local image 'myapp:latest'")


# -- a plain reference nobody has ---------------------------------------------------------------


def test_a_name_typo_says_no_such_local_image_before_the_network_error(tmp_path: Path, offline: list[str]) -> None:
    engine = FakeEngine()
    with pytest.raises(OperationFailed) as e:
        resolve("myapp:latest", sources(tmp_path, lambda: engine))
    message = e.value.diagnostics[0].message
    assert message.startswith("no such local image 'myapp:latest' (not in enclaver's store or the Docker engine), "
                              "and the registry docker.io cannot be reached: "), message
    assert "cannot resolve registry-1.docker.io" in message
    assert "HTTPSConnectionPool" not in message  # the library's text is not the user's
    assert engine.asked == ["myapp:latest"] and offline == ["registry-1.docker.io/library/myapp:latest"]


def test_a_name_the_registry_does_not_know(tmp_path: Path, absent: None) -> None:
    with pytest.raises(OperationFailed) as e:
        resolve("myapp:latest", sources(tmp_path))
    message = e.value.diagnostics[0].message
    assert message.startswith("no such local image 'myapp:latest' (not in enclaver's store or the Docker engine), "
                              "and the registry docker.io says not found: HTTP 404"), message
    assert "typo" in e.value.diagnostics[0].fix


def test_a_registry_nobody_listens_on(tmp_path: Path) -> None:
    with pytest.raises(OperationFailed) as e:
        resolve("localhost:1/myapp:latest", sources(tmp_path))
    message = e.value.diagnostics[0].message
    assert message.startswith("no such local image 'localhost:1/myapp:latest' (not in enclaver's store or the Docker "
                              "engine), and the registry localhost:1 cannot be reached: connection refused"), message


def test_no_engine_is_named_as_the_local_lookup_that_could_not_happen(tmp_path: Path, offline: list[str]) -> None:
    with pytest.raises(OperationFailed) as e:
        resolve("myapp:latest", sources(tmp_path, DeadEngine))
    message = e.value.diagnostics[0].message
    assert message.startswith("no such local image 'myapp:latest' (not in enclaver's store; no Docker engine at "
                              "unix:///nowhere/docker.sock: no socket), and the registry docker.io"), message


def test_pull_points_at_the_engine_when_it_has_the_image(tmp_path: Path, offline: list[str]) -> None:
    """`image pull` does not import from the engine unasked, but says so when that is the way."""
    engine = FakeEngine({"myapp:latest": b""})
    with pytest.raises(OperationFailed) as e:
        resolve("myapp:latest", sources(tmp_path, lambda: engine, use_engine=False))
    diagnostic = e.value.diagnostics[0]
    assert "the Docker engine at unix:///fake/docker.sock has it" in diagnostic.message
    assert "docker-daemon:myapp:latest" in diagnostic.fix


def test_a_stored_tag_is_named_with_the_pinned_reference_that_uses_it(tmp_path: Path, offline: list[str]) -> None:
    digest = make_layout(str(tmp_path / "store"), "docker.io/library/myapp:latest", [[Entry.file("x", b"1")]])
    with pytest.raises(OperationFailed) as e:
        resolve("myapp:latest", sources(tmp_path))
    diagnostic = e.value.diagnostics[0]
    assert f"enclaver's store has it as {digest}" in diagnostic.message, diagnostic.message
    assert f"myapp:latest@{digest}" in diagnostic.fix
    image = resolve(f"myapp:latest@{digest}", sources(tmp_path))  # and that works offline
    assert str(image.digest) == digest and image.source == "store"


# -- image inspect of a tag in the store --------------------------------------------------------


@pytest.mark.parametrize("ref, stored_as", [
    ("app:1", "docker.io/library/app:1"),
    ("localhost:1/app:1", "localhost:1/app:1"),  # a registry nobody listens on
    ("no-such-registry.invalid/team/app:1", "no-such-registry.invalid/team/app:1"),
])
def test_inspect_of_a_stored_tag_answers_from_the_store(cli, ref: str, stored_as: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        no_network: None) -> None:
    digest = make_layout(str(tmp_path / "store"), stored_as, [[Entry.file("x", b"stored")]], cmd=("/x",))
    result = cli("image", "inspect", ref, "--cache-dir", str(tmp_path / "store"), "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert (doc["digest"], doc["cmd"], doc["source"]) == (digest, ["/x"], "store")
    raw = cli("image", "inspect", ref, "--cache-dir", str(tmp_path / "store"), "--raw")
    assert raw.code == 0 and json.loads(raw.stdout)["layers"]


def test_inspect_of_a_typo_says_no_such_local_image(cli, tmp_path: Path, offline: list[str],  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no.sock")
    result = cli("image", "inspect", "myapp:latest", "--cache-dir", str(tmp_path / "store"))
    assert result.code == 1
    assert result.stderr.startswith("error: no such local image 'myapp:latest' (not in enclaver's store; no Docker "
                                    f"engine at unix://{tmp_path}/no.sock"), result.stderr


def test_inspect_prefers_the_engine_to_the_registry_as_a_build_does(tmp_path: Path, no_network: None) -> None:
    from enclaver_rules.oci.resolve import describe

    other = Store(tmp_path / "elsewhere")
    make_layout(str(other.root), "x", [[Entry.file("from", b"engine")]])
    image = load_stored(other, "x", other.resolve("x").digest)  # type: ignore[union-attr]
    engine = FakeEngine({"myapp:latest": b"".join(docker_archive(image, other, "myapp:latest"))})
    found = describe("myapp:latest", sources(tmp_path, lambda: engine))
    assert found.source == "docker-daemon:myapp:latest"
    assert found.manifest.config.digest == image.manifest.config.digest  # the engine's image, not a registry's


# -- oci:<the store>:REF ------------------------------------------------------------------------


def refs(store: Store) -> list[str]:
    return sorted(store.refs())


@pytest.mark.parametrize("tag", ["docker.io/library/app:1", "app:1"])
def test_oci_transport_on_the_store_itself_adds_no_ref(tag: str, tmp_path: Path, in_tmp: Path,
                                                      no_network: None) -> None:
    store = Store(in_tmp / "cache")
    digest = make_layout(str(store.root), "docker.io/library/app:1", [[Entry.file("x", b"1")]])
    before = refs(store)
    image = resolve(f"oci:cache:{tag}", Sources(store, engine=FakeEngine))  # type: ignore[arg-type]
    assert refs(store) == before == ["docker.io/library/app:1"]
    assert str(image.digest) == digest and image.name == "docker.io/library/app:1"
    image = resolve(f"oci:{store.root}:{tag}", Sources(store, engine=FakeEngine))  # type: ignore[arg-type]
    assert refs(store) == before


def test_oci_transport_on_another_layout_keeps_one_ref_so_gc_spares_the_copy(tmp_path: Path,
                                                                             no_network: None) -> None:
    store = Store(tmp_path / "store")
    digest = make_layout(str(tmp_path / "layout"), "v1", [[Entry.file("x", os.urandom(64))]])
    resolve(f"oci:{tmp_path / 'layout'}:v1", Sources(store, engine=FakeEngine))  # type: ignore[arg-type]
    assert refs(store) == [f"imported@{digest}"]
    assert store.gc(grace_seconds=0) == (0, 0)


# -- destinations may not exist yet ---------------------------------------------------------------


def test_push_to_a_new_layout_is_not_a_missing_file(cli, tmp_path: Path, in_tmp: Path,  # type: ignore[no-untyped-def]
                                                    no_network: None) -> None:
    digest = make_layout(str(in_tmp / "layout"), "v1", [[Entry.file("x", b"1")]])
    result = cli("image", "push", "oci:layout:v1", "oci:new:v2", "--cache-dir", str(tmp_path / "store"), "--json")
    assert result.code == 0, result.stderr
    assert Store(in_tmp / "new").resolve("v2").digest == Digest.parse(digest)  # type: ignore[union-attr]
    result = cli("image", "push", "oci:layout:v1", "./out.tar", "--cache-dir", str(tmp_path / "store"))
    assert result.code == 2 and "DEST: ./out.tar is a path, not an image reference" in result.stderr, result.stderr
    result = cli("image", "push", "./nope.tar", "oci:new:v3", "--cache-dir", str(tmp_path / "store"))
    assert result.code == 2 and "SRC: no such file: ./nope.tar" in result.stderr, result.stderr
