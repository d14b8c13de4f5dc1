"""The registry client and image commands against a real registry (distribution 2.8) and fakes."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci import registry as registry_module
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.layer import Entry
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.reference import Reference
from enclaver_rules.oci.registry import NotFound, Registry, RegistryUnavailable
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import load_stored, pull, push
from oci_helpers import make_layout

pytestmark = pytest.mark.services


def leftovers(store: Store) -> list[str]:
    return [p.name for p in store.blobs.iterdir() if p.name.startswith(".")] if store.blobs.is_dir() else []


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "layout"
    digest = make_layout(str(path), "v1", [
        [Entry.file("bin/hello", os.urandom(300_000), 0o755)],
        [Entry.file("etc/greeting", b"hello\n"), Entry.symlink("bin/hi", "hello")],
        [Entry.file(f"data/{i}", os.urandom(50_000)) for i in range(5)],
    ])
    return path, digest


@pytest.fixture
def pushed(cli, registry, layout: tuple[Path, str], tmp_path: Path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    path, digest = layout
    ref = f"{registry.address}/test/app:v1"
    result = cli("image", "push", f"oci:{path}:v1", ref, "--cache-dir", str(tmp_path / "cache-push"), "--json")
    assert result.code == 0, result.stderr
    assert result.json()["digest"] == digest
    return ref, digest


def test_push_pull_round_trip_and_skopeo_reads_the_store(cli, pushed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, digest = pushed
    cache = tmp_path / "cache"
    result = cli("image", "pull", ref, "--cache-dir", str(cache), "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert (doc["name"], doc["digest"], doc["platform"]) == (ref, digest, "linux/amd64")
    store = Store(cache)
    assert store.verify() == [] and leftovers(store) == []
    skopeo = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{cache}:{ref}"], capture_output=True, timeout=60)
    assert skopeo.returncode == 0, skopeo.stderr
    assert str(Digest.of(skopeo.stdout)) == digest  # skopeo reads exactly the manifest bytes we stored
    config = subprocess.run(["skopeo", "inspect", "--config", f"oci:{cache}:{ref}"], capture_output=True, timeout=60)
    assert json.loads(config.stdout)["architecture"] == "amd64"


def test_second_push_skips_and_other_repository_mounts(pushed, tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    ref, digest = pushed
    store = Store(tmp_path / "s").init()
    reg = Registry(registry.address)
    image = pull(Reference.parse(ref), store, reg)
    blobs = [image.manifest.config, *image.manifest.layers]
    assert {reg.push_blob("test/app", d, lambda d=d: store.open(d.digest)).how for d in blobs} == {"exists"}
    hows = {reg.push_blob("other/app", d, lambda d=d: store.open(d.digest), mount_from="test/app").how for d in blobs}
    assert hows == {"mounted"}
    assert push(image, store, Reference.parse(f"{registry.address}/other/app:copy"), reg) == Digest.parse(digest)


def test_inspect_reads_manifest_and_config_only(cli, pushed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, digest = pushed
    cache = tmp_path / "cache"
    doc = cli("image", "inspect", ref, "--cache-dir", str(cache), "--json").json()
    assert doc["digest"] == digest and doc["cmd"] == ["/bin/sh"] and len(doc["layers"]) == 3
    assert not (cache / "blobs").exists() or not any((cache / "blobs" / "sha256").iterdir())
    raw = cli("image", "inspect", ref, "--cache-dir", str(cache), "--raw").stdout.encode()
    assert str(Digest.of(raw)) == digest


def _blob_data(registry, digest: str) -> Path:  # type: ignore[no-untyped-def]
    hex_ = digest.split(":")[1]
    return registry.root / "data/docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


def test_tampered_blob_in_registry_storage_is_refused(cli, pushed, registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, _ = pushed
    store = Store(tmp_path / "probe").init()
    image = pull(Reference.parse(ref), store, Registry(registry.address))
    victim = image.manifest.layers[0]
    data = _blob_data(registry, str(victim.digest))
    original = data.read_bytes()
    data.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        cache = tmp_path / "cache"
        result = cli("image", "pull", ref, "--cache-dir", str(cache))
        assert result.code == 1
        assert "content is sha256:" in result.stderr and str(victim.digest) in result.stderr
        fresh = Store(cache)
        assert not fresh.has(victim.digest) and fresh.refs() == {} and leftovers(fresh) == []
    finally:
        data.write_bytes(original)


def test_unknown_digest_and_tag(cli, pushed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, _ = pushed
    repo = ref.rsplit(":", 1)[0]
    result = cli("image", "pull", f"{repo}@sha256:{'0' * 64}", "--cache-dir", str(tmp_path / "c"))
    assert result.code == 1 and "not found" in result.stderr and "MANIFEST_UNKNOWN" in result.stderr
    result = cli("image", "pull", f"{repo}:nope", "--cache-dir", str(tmp_path / "c"))
    assert result.code == 1 and f"no such local image '{repo}:nope'" in result.stderr
    assert f"and the registry {repo.split('/')[0]} says not found: HTTP 404" in result.stderr


def test_platform_is_chosen_from_an_index_not_from_the_host(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(registry.address)
    children = []
    for arch in ("amd64", "arm64"):
        layout = tmp_path / arch
        make_layout(str(layout), "x", [[Entry.file("arch", arch.encode())]], arch=arch)
        src = Store(layout)
        image = load_stored(src, "x", src.resolve("x").digest)  # type: ignore[union-attr]
        push(image, src, Reference.parse(f"{registry.address}/multi/app:{arch}"), reg)
        children.append({**image.manifest.descriptor().to_json(), "platform": {"os": "linux", "architecture": arch}})
    index = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": children})
    reg.put_manifest("multi/app", "all", index, mt.OCI_INDEX)
    from enclaver_rules.oci.model import Platform

    store = Store(tmp_path / "s").init()
    arm = pull(Reference.parse(f"{registry.address}/multi/app:all"), store, reg, platform=Platform.parse("linux/arm64"))
    assert arm.config.platform.architecture == "arm64"
    assert dict(store.resolve(arm.name).annotations)["io.enclaver.index"] == str(Digest.of(index))  # type: ignore[union-attr]
    default = pull(Reference.parse(f"{registry.address}/multi/app:all"), store, reg)
    assert default.config.platform.architecture == "amd64"


def test_dead_registry_fails_fast_with_a_clear_error(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from services import free_port

    result = cli("image", "pull", f"127.0.0.1:{free_port()}/x:1", "--cache-dir", str(tmp_path / "c"))
    assert result.code == 1
    assert "cannot be reached: connection refused" in result.stderr


# -- a registry that lies ------------------------------------------------------------------------


class _Liar(http.server.BaseHTTPRequestHandler):
    manifest = b""
    blob = b""
    blob_digest = ""
    mode = ""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if "/manifests/" in self.path:
            body = self.manifest
            self.send_response(200)
            self.send_header("Content-Type", mt.OCI_MANIFEST)
            self.send_header("Content-Length", str(len(body)))
            if self.mode == "bad-digest-header":
                self.send_header("Docker-Content-Digest", "sha256:" + "f" * 64)
            self.end_headers()
            self.wfile.write(body)
        elif "/blobs/" in self.path:
            body = self.blob
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if self.mode == "truncate" else body)
            if self.mode == "truncate":
                self.wfile.flush()
                self.connection.shutdown(2)
        else:
            self.send_response(404)
            self.end_headers()

    def do_HEAD(self) -> None:
        self.send_response(404)
        self.end_headers()


@pytest.fixture
def liar() -> Iterator[tuple[str, type[_Liar]]]:
    blob = os.urandom(200_000)
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:' + b"1" * 64 + b'"]}}'
    handler = type("Liar", (_Liar,), {})
    handler.blob = blob
    manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                               "config": {"mediaType": mt.OCI_CONFIG, "digest": str(Digest.of(config)), "size": len(config)},
                               "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": str(Digest.of(blob)), "size": len(blob)}]})
    handler.manifest = manifest
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


def test_pinned_manifest_with_other_bytes_is_refused(liar, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    host, handler = liar
    pinned = Reference.parse(f"{host}/x@sha256:{'2' * 64}")
    with pytest.raises(DigestMismatch, match="served content is"):
        Registry(host).get_manifest(pinned.repository, pinned.selector)
    handler.mode = "bad-digest-header"
    with pytest.raises(DigestMismatch, match="Docker-Content-Digest says"):
        Registry(host).get_manifest("x", "latest")


def test_truncated_blob_keeps_nothing(liar, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    host, handler = liar
    handler.mode = "truncate"
    store = Store(tmp_path / "s").init()
    descriptor = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(handler.blob), len(handler.blob))
    with pytest.raises((DigestMismatch, RegistryUnavailable)):
        Registry(host, retries=0).fetch_blob("x", descriptor, store)
    assert not store.has(descriptor.digest) and leftovers(store) == []


def test_plain_http_only_for_local_or_named_hosts() -> None:
    assert Registry("127.0.0.1:5000").scheme == "http" and Registry("localhost:5000").scheme == "http"
    assert Registry("[::1]:5000").scheme == "http"
    assert Registry("registry.example.com").scheme == "https"
    assert Registry("registry.example.com", insecure=True).scheme == "http"


def test_a_silent_registry_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts connections, never answers
    monkeypatch.setattr(registry_module, "READ_TIMEOUT", 0.5)
    try:
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(RegistryUnavailable, match=r"ReadTimeout|timed out"):
            Registry(host, retries=0).get_manifest("x", "latest")
    finally:
        listener.close()


def test_credentials_from_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"registry.example.com": {"auth": "dTpw"},
                                            "https://index.docker.io/v1/": {"username": "u", "password": "p"}},
                                  "credHelpers": {"helped.example.com": "enctest"}}))
    helper = tmp_path / "bin" / "docker-credential-enctest"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread host\necho "{\\"Username\\": \\"bot\\", \\"Secret\\": \\"s3cret-$host\\"}"\n')
    helper.chmod(0o755)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    assert registry_module.basic_credentials("registry.example.com") == "dTpw"
    assert registry_module.basic_credentials("docker.io") == base64.b64encode(b"u:p").decode()
    # the client is made for the API host (registry-1.docker.io); `docker login` keys Docker Hub by its index URL
    assert registry_module.basic_credentials("registry-1.docker.io") == base64.b64encode(b"u:p").decode()
    assert base64.b64decode(registry_module.basic_credentials("helped.example.com") or "") == \
        b"bot:s3cret-helped.example.com"
    assert registry_module.basic_credentials("nobody.example.com") is None
    assert shutil.which("docker-credential-enctest")


def test_notfound_is_an_operation_failure(registry) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFound):
        Registry(registry.address).get_manifest("missing/repo", "latest")
