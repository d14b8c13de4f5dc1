"""Cache integrity on use: a blob whose bytes rotted in the store is caught whenever it is read (pull,
push, copy_file, an EIF build, a docker-archive stream), moved to quarantine, and fetched again
from its registry or refused with an error naming the digest, the file and the fix.

The registry here is a small in-process one (the Distribution API subset enclaver speaks; it
checks digests on upload, as real registries do), so these tests need no services."""

from __future__ import annotations

import collections
import hashlib
import http.server
import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Result
from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.model import Manifest
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.store import BackgroundCheck, CorruptBlob, Store
from enclaver_rules.oci.transfer import docker_archive, load_stored
from oci_helpers import tar_bytes

Cli = Callable[..., Result]


# -- a registry ----------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    blobs: dict[str, bytes]
    manifests: dict[str, tuple[bytes, str]]
    gets: collections.Counter[str]
    uploads: dict[str, bytes]

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self) -> tuple[str, str, str] | None:
        m = re.fullmatch(r"/v2/(.+?)/(manifests|blobs/uploads|blobs)/([^?]*)(\?.*)?", self.path)
        return (m.group(1), m.group(2), m.group(3)) if m else None

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return self._send(200 if self.path == "/v2/" else 404)
        _, kind, ref = route
        if kind == "manifests" and ref in self.manifests:
            raw, media_type = self.manifests[ref]
            return self._send(200, raw, {"Content-Type": media_type, "Docker-Content-Digest": str(Digest.of(raw))})
        if kind == "blobs" and ref in self.blobs:
            self.gets[ref] += 1
            return self._send(200, self.blobs[ref])
        return self._send(404, b'{"errors":[{"code":"NOT_FOUND","message":"no"}]}')

    do_HEAD = do_GET

    def do_POST(self) -> None:
        route = self._route()
        if route is None or route[1] != "blobs/uploads":
            return self._send(404)
        upload = f"u{len(self.uploads)}"
        self.uploads[upload] = b""
        return self._send(202, headers={"Location": f"/v2/{route[0]}/blobs/uploads/{upload}"})

    def do_PUT(self) -> None:
        route = self._route()
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        except OSError:
            return None  # the client gave up mid-body
        if route is None:
            return self._send(404)
        _, kind, ref = route
        if kind == "manifests":
            self.manifests[ref] = self.manifests[str(Digest.of(body))] = (body, self.headers["Content-Type"])
            return self._send(201, headers={"Docker-Content-Digest": str(Digest.of(body))})
        digest = re.search(r"digest=([^&]+)", self.path)
        if digest is None or str(Digest.of(body)) != digest.group(1).replace("%3A", ":"):
            return self._send(400, b'{"errors":[{"code":"DIGEST_INVALID","message":"digest mismatch"}]}')
        self.blobs[str(Digest.of(body))] = body
        return self._send(201)


def _start() -> tuple[http.server.ThreadingHTTPServer, str, type[_Handler]]:
    handler = type("Registry", (_Handler,), {"blobs": {}, "manifests": {}, "gets": collections.Counter(),
                                              "uploads": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}", handler


@pytest.fixture
def fake_registry() -> Iterator[tuple[str, type[_Handler]]]:
    server, host, handler = _start()
    yield host, handler
    server.shutdown()


@pytest.fixture
def fake_destination() -> Iterator[tuple[str, type[_Handler]]]:
    server, host, handler = _start()
    yield host, handler
    server.shutdown()


def _serve_image(handler: type[_Handler], repo_tag: str = "app:1") -> dict[str, str]:
    """An image with a gzip layer and a plain one; returns the digests by role."""
    gz = tar_bytes([("etc/", "dir", ""), ("etc/motd", "file", "hello " * 500)])
    plain = tar_bytes([("bin/", "dir", ""), ("bin/app", "file", os.urandom(3000))], compress=False)
    config = canonical_json({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/app"]},
                             "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(gzip_inflate(gz))),
                                                                       str(Digest.of(plain))]}})
    manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                               "config": {"mediaType": mt.OCI_CONFIG, "digest": str(Digest.of(config)),
                                          "size": len(config)},
                               "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": str(Digest.of(gz)), "size": len(gz)},
                                          {"mediaType": mt.OCI_LAYER, "digest": str(Digest.of(plain)),
                                           "size": len(plain)}]})
    for blob in (gz, plain, config):
        handler.blobs[str(Digest.of(blob))] = blob
    handler.manifests[repo_tag.split(":")[1]] = handler.manifests[str(Digest.of(manifest))] = (manifest, mt.OCI_MANIFEST)
    return {"layer-gz": str(Digest.of(gz)), "layer-plain": str(Digest.of(plain)), "config": str(Digest.of(config)),
            "manifest": str(Digest.of(manifest))}


def gzip_inflate(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data)


def rot(store: Store, digest: str, how: str) -> None:
    """Damage a kept blob as a failing disk would (its times unchanged): one flipped byte, or cut short."""
    path = store.path(Digest.parse(digest))
    before = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "flip-last":  # where a reader that stops early never looks: a tar's trailing padding
        data[-1] ^= 0x01
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def intact(store: Store, digest: str) -> bool:
    path = store.path(Digest.parse(digest))
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == Digest.parse(digest).hex


# -- pull ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("role", ["layer-gz", "layer-plain", "config", "manifest"])
@pytest.mark.parametrize("pinned", [False, True])
def test_pull_finds_a_rotted_blob_quarantines_it_and_fetches_it_again(
        cli: Cli, fake_registry: tuple[str, type[_Handler]], tmp_path: Path, role: str, how: str, pinned: bool) -> None:
    host, handler = fake_registry
    digests = _serve_image(handler)
    ref = f"{host}/app@{digests['manifest']}" if pinned else f"{host}/app:1"
    cache = tmp_path / "cache"
    first = cli("image", "pull", ref, "--cache-dir", str(cache))
    assert first.code == ExitCode.OK, first.stderr
    store = Store(cache)
    rot(store, digests[role], how)
    again = cli("image", "pull", ref, "--cache-dir", str(cache))
    assert again.code == ExitCode.OK, again.stderr
    assert intact(store, digests[role])
    assert store.verify() == []
    [quarantined] = store.quarantined()
    assert quarantined.name.startswith(f"sha256-{Digest.parse(digests[role]).hex}")
    if role != "manifest":  # the manifest comes from the registry anyway (a tag) or heals in place
        assert handler.gets[digests[role]] == 2
        assert "quarantine" in again.stderr


def test_a_pull_of_a_healthy_image_hashes_only_what_it_did_not_just_write(
        cli: Cli, fake_registry: tuple[str, type[_Handler]], tmp_path: Path) -> None:
    host, handler = fake_registry
    digests = _serve_image(handler)
    cache = tmp_path / "cache"
    assert cli("image", "pull", f"{host}/app:1", "--cache-dir", str(cache)).code == ExitCode.OK
    assert cli("image", "pull", f"{host}/app:1", "--cache-dir", str(cache)).code == ExitCode.OK
    assert all(handler.gets[digests[r]] == 1 for r in ("layer-gz", "layer-plain", "config"))
    assert Store(cache).quarantined() == []


# -- reads by copy_file, docker_archive, the EIF build, another store ----------------------------


@pytest.fixture
def pulled(cli: Cli, fake_registry: tuple[str, type[_Handler]], tmp_path: Path) -> tuple[Store, Manifest, dict[str, str]]:
    host, handler = fake_registry
    digests = _serve_image(handler)
    result = cli("image", "pull", f"{host}/app:1", "--cache-dir", str(tmp_path / "cache"))
    assert result.code == ExitCode.OK, result.stderr
    store = Store(tmp_path / "cache")
    manifest = store.manifest(Digest.parse(digests["manifest"]))
    assert isinstance(manifest, Manifest)
    return store, manifest, digests


def _refused(error: CorruptBlob, store: Store, digest: str) -> None:
    """The error names the digest, the file, and the fix; the blob is in quarantine, not used."""
    text = str(error)
    assert digest in text and str(store.path(Digest.parse(digest))) in text
    assert "enclaver cache verify" in text and "pull the image again" in text
    assert not store.has(Digest.parse(digest)) and len(store.quarantined()) == 1


@pytest.mark.parametrize("how", ["flip", "flip-last", "truncate"])
def test_copy_file_refuses_a_rotted_layer(pulled: tuple[Store, Manifest, dict[str, str]], how: str) -> None:
    store, manifest, digests = pulled
    assert store.copy_file(manifest, "/bin/app", io.BytesIO())
    rot(store, digests["layer-plain"], how)
    with pytest.raises(CorruptBlob) as caught:
        store.copy_file(manifest, "/bin/app", io.BytesIO())
    _refused(caught.value, store, digests["layer-plain"])


@pytest.mark.parametrize("role", ["layer-gz", "config"])
def test_a_docker_archive_stream_refuses_a_rotted_blob(pulled: tuple[Store, Manifest, dict[str, str]],
                                                      role: str) -> None:
    """What `image push docker-daemon:` and the nitro-cli backend send to the engine."""
    store, manifest, digests = pulled
    image = load_stored(store, "app", manifest.digest)
    rot(store, digests[role], "flip")
    with pytest.raises(CorruptBlob) as caught:
        for _ in docker_archive(image, store, "app:1"):
            pass
    _refused(caught.value, store, digests[role])


def test_another_store_refuses_a_rotted_source_and_keeps_nothing(
        pulled: tuple[Store, Manifest, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _, digests = pulled
    layout = Store(tmp_path / "layout").init()
    layer = Digest.parse(digests["layer-plain"])
    hashed: list[int] = []
    real = hashlib.sha256

    class Counting:
        def __init__(self, data: bytes = b"") -> None:
            self.h = real(data)
            hashed.append(len(data))

        def update(self, data: bytes) -> None:
            hashed.append(len(data))
            self.h.update(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr("enclaver_rules.oci.store.hashlib.sha256", Counting)
    with store.open(layer) as f:
        layout.put_stream(f, layer, store.path(layer).stat().st_size)
    assert sum(hashed) == store.path(layer).stat().st_size  # hashed once, not by both stores
    monkeypatch.undo()
    rot(store, digests["layer-plain"], "flip")
    other = Store(tmp_path / "layout2").init()
    with pytest.raises(CorruptBlob) as caught, store.open(layer) as f:
        other.put_stream(f, layer, 10_000_000)
    _refused(caught.value, store, digests["layer-plain"])
    assert not other.has(layer) and [p.name for p in other.blobs.iterdir()] == []


@pytest.mark.parametrize("role", ["layer-gz", "layer-plain"])
def test_an_eif_build_refuses_a_rotted_layer(pulled: tuple[Store, Manifest, dict[str, str]], tmp_path: Path,
                                            role: str) -> None:
    from enclaver_rules.eif.blobs import write_dev_blobs
    from enclaver_rules.eif.build import build_eif

    store, manifest, digests = pulled
    image = load_stored(store, "app", manifest.digest)
    blobs = write_dev_blobs(tmp_path / "blobs", "x86_64")
    build_eif(image, store, blobs, tmp_path / "good.eif")
    rot(store, digests[role], "flip-last")
    with pytest.raises(CorruptBlob) as caught:
        build_eif(image, store, blobs, tmp_path / "bad.eif")
    _refused(caught.value, store, digests[role])
    assert not (tmp_path / "bad.eif").exists()


def test_background_check_finds_a_rotted_blob_among_good_ones(pulled: tuple[Store, Manifest, dict[str, str]]) -> None:
    store, _, digests = pulled
    rot(store, digests["layer-plain"], "truncate")
    check = BackgroundCheck()
    for role in ("layer-gz", "layer-plain", "config"):
        check.add(store.path(Digest.parse(digests[role])))
    check.add("/not/a/store/blob")  # not named by a digest: nothing to check
    check.wait(store.path(Digest.parse(digests["layer-gz"])))
    with pytest.raises(CorruptBlob) as caught:
        check.wait()
    _refused(caught.value, store, digests["layer-plain"])


# -- push ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["layer-gz", "layer-plain", "config"])
def test_push_refuses_a_rotted_blob_and_fetches_it_again_from_the_source_registry(
        cli: Cli, fake_registry: tuple[str, type[_Handler]], fake_destination: tuple[str, type[_Handler]], tmp_path: Path,
        role: str) -> None:
    host, handler = fake_registry
    dest_host, dest = fake_destination
    digests = _serve_image(handler)
    cache = tmp_path / "cache"
    assert cli("image", "pull", f"{host}/app:1", "--cache-dir", str(cache)).code == ExitCode.OK
    store = Store(cache)
    rot(store, digests[role], "flip")
    result = cli("image", "push", f"{host}/app:1", f"{dest_host}/copy:1", "--cache-dir", str(cache))
    assert result.code == ExitCode.OK, result.stderr
    assert "quarantine" in result.stderr and handler.gets[digests[role]] == 2  # fetched again from the source
    assert hashlib.sha256(dest.blobs[digests[role]]).hexdigest() == Digest.parse(digests[role]).hex
    assert dest.manifests["1"][0] == handler.manifests["1"][0]
    assert intact(store, digests[role]) and len(store.quarantined()) == 1


def test_push_to_a_layout_refuses_a_rotted_blob_it_cannot_fetch_again(cli: Cli, tmp_path: Path) -> None:
    """The source is the store itself (oci:<store>:TAG): nothing to fetch again, a clear error."""
    from oci_helpers import make_layout

    cache = tmp_path / "cache"
    digest = make_layout(str(cache), "app:1", [[_entry("bin/app", os.urandom(5000))]])
    store = Store(cache)
    manifest = store.manifest(Digest.parse(digest))
    assert isinstance(manifest, Manifest)
    layer = str(manifest.layers[0].digest)
    rot(store, layer, "flip")
    result = cli("image", "push", f"oci:{cache}:app:1", f"oci:{tmp_path / 'out'}:app:1", "--cache-dir", str(cache))
    assert result.code == ExitCode.FAILURE, result.stdout
    assert layer in result.stderr and "enclaver cache verify" in result.stderr and "Traceback" not in result.stderr
    assert not Store(tmp_path / "out").has(Digest.parse(layer))


def _entry(path: str, data: bytes) -> Any:
    from enclaver_rules.oci.layer import Entry

    return Entry.file(path, data)


# -- the store's own writes heal a rotted copy ------------------------------------------------------


@pytest.mark.parametrize("how", ["flip", "flip-last", "truncate", "longer"])
def test_putting_a_blob_again_replaces_a_rotted_copy(tmp_path: Path, how: str) -> None:
    store = Store(tmp_path).init()
    data = os.urandom(3 << 20)
    digest = store.put_bytes(data)
    if how == "longer":
        path = store.path(digest)
        os.chmod(path, 0o644)
        path.write_bytes(data + b"x")
    else:
        rot(store, str(digest), how)
    assert store.put([data[:1 << 20], data[1 << 20:]], digest, len(data)) == digest
    assert store.path(digest).read_bytes() == data and len(store.quarantined()) == 1
    assert [p.name for p in store.blobs.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(DigestMismatch):  # a bad stream never replaces a good copy
        store.put_bytes(data[:-1] + b"?", digest)
    assert store.path(digest).read_bytes() == data


def test_a_layer_tar_read_by_seeking_is_still_hashed_whole(tmp_path: Path) -> None:
    """tarfile skips members' data by seeking: the skipped bytes are hashed all the same."""
    store = Store(tmp_path).init()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"f{i}")
            data = os.urandom(200_000)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    digest = store.put_bytes(raw.getvalue())
    path = store.path(digest)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[600_000] ^= 1  # inside f2's data: read by nobody below
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlob), store.open(digest) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        assert [m.name for m in tar] == ["f0", "f1", "f2"]


def test_the_quarantine_is_reported_by_cache_verify(cli: Cli, tmp_path: Path) -> None:
    store = Store(tmp_path / "cache").init()
    good, bad = store.put_bytes(b"good"), store.put_bytes(b"bad!")
    rot(store, str(bad), "flip")
    result = cli("cache", "verify", "--cache-dir", str(store.root), "--json")
    assert result.code == ExitCode.FAILURE
    doc = json.loads(result.stdout)
    [problem] = doc["problems"]
    assert "moved to" in problem["message"] and len(doc["quarantine"]) == 1
    assert store.has(good) and not store.has(bad)
    again = cli("cache", "verify", "--cache-dir", str(store.root))
    assert again.code == ExitCode.OK and "damaged copy kept in" in again.stderr


# -- a blob set taken from an image (eif build --blobs IMAGE, the rule set's equivalent) ---------------


@pytest.mark.parametrize("how", ["flip", "flip-last", "truncate"])
def test_a_rotted_blob_set_layer_is_refused_and_leaves_no_staging(tmp_path: Path, how: str) -> None:
    from enclaver_rules.eif import blobs as blobs_module
    from enclaver_rules.eif.blobs import write_dev_blobs
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout

    dev = write_dev_blobs(tmp_path / "dev", "x86_64")
    files = [Entry.file(f"blobs/{p.name}", p.read_bytes()) for p in sorted((tmp_path / "dev").iterdir())]
    cache = tmp_path / "cache"
    digest = make_layout(str(cache), "blobs:1", [files[:2], files[2:]])
    store = Store(cache)
    image = load_stored(store, "blobs:1", Digest.parse(digest))
    rot(store, str(image.manifest.layers[1].digest), how)
    with pytest.raises(CorruptBlob) as caught:
        blobs_module.load_image_blobs(store, image, "x86_64")
    _refused(caught.value, store, str(image.manifest.layers[1].digest))
    assert [p.name for p in (cache / "blobs").iterdir() if ".tmp-" in p.name] == []
    assert store.staging() == []
    # fetched (here: written) again, the set is taken and is the one the files make
    make_layout(str(cache), "blobs:1", [files[:2], files[2:]])
    assert blobs_module.load_image_blobs(store, image, "x86_64").digest == dev.digest


def test_a_running_builds_work_directory_is_not_removed_by_another_build(tmp_path: Path) -> None:
    """eif_enclave removed every `.tmp-*` in the enclave's directory, a concurrent build's too."""
    import subprocess
    import sys

    from enclaver_rules.rules.eif import remove_stale_work

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        running = tmp_path / f".tmp-{'a' * 32}-{live.pid}"
        killed = tmp_path / f".tmp-{'b' * 32}-{dead.stdout.strip()}"
        for d in (running, killed):
            d.mkdir()
            (d / "application.eif").write_bytes(b"x")
        remove_stale_work(tmp_path)
        assert running.is_dir() and not killed.exists()
    finally:
        live.kill()
        live.wait()
