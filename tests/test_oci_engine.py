"""The Docker engine adapter and image resolution, against a private dockerd."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import docker
import pytest

from enclaver_rules.oci.engine import Engine
from enclaver_rules.oci.flatten import flatten
from enclaver_rules.oci.resolve import Sources, resolve
from enclaver_rules.oci.store import Store

pytestmark = pytest.mark.services
BUSYBOX = Path("/bin/busybox")


@pytest.fixture(scope="module")
def engine_image(dockerd) -> str:  # type: ignore[no-untyped-def]
    """`docker import` of a root holding Debian's busybox-static: a runnable, libc-less image."""
    assert BUSYBOX.is_file(), "busybox-static is missing: apt-get install busybox-static (README command (b))"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("bin", "tmp", "etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    client.api.import_image_from_data(buf.getvalue(), repository="enclaver-test/busybox", tag="1",
                                      changes=['CMD ["/bin/sh"]'])
    client.close()
    return "enclaver-test/busybox:1"


@pytest.fixture
def env(dockerd, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    return dockerd


def test_engine_image_into_the_store_and_flattened(env, engine_image: str, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    result = cli("image", "pull", f"docker-daemon:{engine_image}", "--cache-dir", str(cache), "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["name"] == "docker.io/enclaver-test/busybox:1"
    store = Store(cache)
    image = resolve(f"docker-daemon:{engine_image}", Sources(store))
    assert str(image.digest) == doc["digest"]  # the same engine content always gives the same manifest
    root = flatten([(str(d.digest), store.open(d.digest)) for d in image.manifest.layers], tmp_path / "root")
    assert (root.root / "bin/busybox").read_bytes() == BUSYBOX.read_bytes()
    assert image.config.cmd == ["/bin/sh"]
    skopeo = subprocess.run(["skopeo", "inspect", f"oci:{cache}:{image.name}"], capture_output=True, timeout=60)
    assert skopeo.returncode == 0, skopeo.stderr


def test_docker_archive_matches_the_engine(env, engine_image: str, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    archive = tmp_path / "bb.tar"
    with open(archive, "wb") as f:
        for chunk in Engine().save(engine_image):
            f.write(chunk)
    via_engine = cli("image", "pull", f"docker-daemon:{engine_image}", "--cache-dir", str(tmp_path / "a"), "--json")
    via_file = cli("image", "pull", f"docker-archive:{archive}", "--cache-dir", str(tmp_path / "b"), "--json")
    assert via_file.code == 0, via_file.stderr
    assert via_file.json()["digest"] == via_engine.json()["digest"]


def test_load_into_the_engine_and_run(env, engine_image: str, tmp_path: Path, cli, dockerd) -> None:  # type: ignore[no-untyped-def]
    cache = str(tmp_path / "cache")
    result = cli("image", "push", f"docker-daemon:{engine_image}", "docker-daemon:enclaver-test/loaded:2",
                 "--cache-dir", cache)
    assert result.code == 0, result.stderr
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        loaded = client.images.get("enclaver-test/loaded:2")
        original = client.images.get(engine_image)
        assert loaded.id == original.id  # the same config: the engine sees the same image
        output = client.containers.run("enclaver-test/loaded:2", ["/bin/busybox", "echo", "from the store"],
                                       network_mode="none", remove=True)
        assert output == b"from the store\n"
    finally:
        client.close()


def test_resolution_prefers_engine_for_tags_and_says_where_it_looked(env, engine_image: str, tmp_path: Path,
                                                                     registry) -> None:  # type: ignore[no-untyped-def]
    store = Store(tmp_path / "cache")
    image = resolve(engine_image, Sources(store))
    assert image.source.startswith("docker-daemon:")
    from enclaver_rules.errors import OperationFailed

    with pytest.raises(OperationFailed) as e:
        resolve(f"{registry.address}/nobody/has:this", Sources(store))
    message = e.value.diagnostics[0].message
    assert message.startswith(f"no such local image '{registry.address}/nobody/has:this' (not in enclaver's store "
                              "or the Docker engine)"), message
    assert f"and the registry {registry.address} says not found" in message


def test_engine_absent_is_named_in_the_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no.sock")
    from enclaver_rules.errors import OperationFailed

    with pytest.raises(OperationFailed) as e:
        resolve(f"{registry.address}/nobody/has:this", Sources(Store(tmp_path / "c")))
    assert "no Docker engine at unix://" in e.value.diagnostics[0].message


def test_pinned_reference_is_served_from_the_store(cli, registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout

    digest = make_layout(str(tmp_path / "l"), "v", [[Entry.file("x", b"pinned")]])
    ref = f"{registry.address}/pin/app"
    assert cli("image", "push", f"oci:{tmp_path / 'l'}:v", f"{ref}:v", "--cache-dir", str(tmp_path / "p")).code == 0
    store = Store(tmp_path / "cache")
    first = resolve(f"{ref}@{digest}", Sources(store, use_engine=False))
    assert first.source.startswith("registry")
    second = resolve(f"{ref}@{digest}", Sources(store, use_engine=False))
    assert second.source == "store" and second.digest == first.digest


def test_pull_through_the_engine(env, cli, registry, tmp_path: Path, dockerd) -> None:  # type: ignore[no-untyped-def]
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout

    make_layout(str(tmp_path / "l"), "v", [[Entry.file("via/engine", b"through dockerd")]])
    ref = f"{registry.address}/via/engine:v"
    assert cli("image", "push", f"oci:{tmp_path / 'l'}:v", ref, "--cache-dir", str(tmp_path / "p")).code == 0
    result = cli("image", "pull", "--via-engine", ref, "--cache-dir", str(tmp_path / "c"), "--json")
    assert result.code == 0, result.stderr
    assert result.json()["source"] == f"docker-daemon:{ref}"
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        assert client.images.get(ref)  # the engine pulled it
    finally:
        client.close()
