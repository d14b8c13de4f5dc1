"""odyn for aarch64: the default odyn image is picked by the app's architecture, and a missing or
mismatched one is refused with what to do. With ENC_TEST_AARCH64=1 (root, qemu-user-static with
binfmt; about 8 minutes): the build in an arm64 root under qemu, twice to the same bytes, and the
binary running in an arm64 root with no libc."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from doit.exceptions import TaskFailed
from test_odyn_supervisor import collect

from enclaver_rules.eif.blobs import write_dev_blobs
from enclaver_rules.errors import InvalidInput
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.layer import Entry
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import load_stored
from enclaver_rules.odyn_image import cross
from enclaver_rules.odyn_image.build import Binary
from enclaver_rules.odyn_image.image import DEFAULT_TAGS, ODYN_PATH, put_image, write_record
from enclaver_rules.rules.odyn import record_path
from enclaver_rules.rules.resolve import resolve_enclave
from oci_helpers import make_layout


def _enclave(tmp_path: Path, arch: str, odyn: str | None = None) -> Path:
    write_dev_blobs(tmp_path / "blobs", "aarch64" if arch == "arm64" else "x86_64")
    make_layout(str(tmp_path / "app"), "latest", [[Entry.file("bin/app", b"#!/bin/sh\n", 0o755)]], arch=arch,
                cmd=("/bin/app",))
    manifest = tmp_path / "enclaver.yaml"
    manifest.write_text("version: v1\nname: app\ntarget: example.test/app:release\nsources:\n  app: oci:app:latest\n"
                        + (f"  odyn: {odyn}\n" if odyn else "") + "build:\n  blobs: blobs\n")
    return manifest


def _fake_default(cache: Path, arch: str) -> str:
    """A default odyn image for `arch` in the store and its record, as the odyn_image tasks leave them."""
    binary = cache / f"odyn-{arch}"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_bytes(b"\x7fELF stand-in for " + arch.encode())
    data = binary.read_bytes()
    image = put_image(Store(cache).init(), Binary(binary, len(data), hashlib.sha256(data).hexdigest(), "3.11.2",
                                                  "glibc 2.36", "0" * 64), DEFAULT_TAGS[arch], arch)
    write_record(record_path(str(cache), arch), image)
    return str(image.digest)


def test_an_aarch64_app_gets_the_aarch64_default_odyn_image(tmp_path: Path) -> None:
    manifest = _enclave(tmp_path, "arm64")
    _fake_default(tmp_path / "cache", "x86_64")
    digest = _fake_default(tmp_path / "cache", "aarch64")
    doc = resolve_enclave(str(manifest), "app", str(tmp_path / "cache"))
    assert isinstance(doc, dict), doc
    assert doc["odyn"]["ref"] == "enclaver/odyn:default-aarch64" and doc["odyn"]["digest"] == digest
    assert doc["sleeve"] is None  # no aarch64 runtime image: the release keeps an empty base
    image = load_stored(Store(tmp_path / "cache"), DEFAULT_TAGS["aarch64"], Digest.parse(digest))
    assert image.config.platform.architecture == "arm64"
    assert image.config.entrypoint == [ODYN_PATH]


def _fake_runtime(cache: Path) -> str:
    """enclaver's runtime image in the store and its record, as the runtime_image task leaves them."""
    from enclaver_rules.odyn_image import runtime_image

    binary = cache / "enclaver-run"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_bytes(b"\x7fELF stand-in for enclaver-run")
    data = binary.read_bytes()
    image = runtime_image.put_image(Store(cache).init(), Binary(binary, len(data), hashlib.sha256(data).hexdigest(),
                                                                "3.11.2", "glibc 2.36", "0" * 64))
    runtime_image.write_record(record_path(str(cache), kind="runtime"), image)
    return str(image.digest)


def test_an_x86_64_app_still_gets_the_x86_64_one(tmp_path: Path) -> None:
    manifest = _enclave(tmp_path, "amd64")
    digest = _fake_default(tmp_path / "cache", "x86_64")
    _fake_default(tmp_path / "cache", "aarch64")
    runtime = _fake_runtime(tmp_path / "cache")
    doc = resolve_enclave(str(manifest), "app", str(tmp_path / "cache"))
    assert isinstance(doc, dict), doc
    assert doc["odyn"] == {"ref": "enclaver/odyn:default", "name": doc["odyn"]["name"], "digest": digest}
    # the release image's default base is enclaver's runtime image (x86_64 only, for now)
    assert doc["sleeve"]["ref"] == "enclaver/runtime:default" and doc["sleeve"]["digest"] == runtime


def test_without_the_runtime_image_resolve_names_the_task(tmp_path: Path) -> None:
    manifest = _enclave(tmp_path, "amd64")
    _fake_default(tmp_path / "cache", "x86_64")
    failed = resolve_enclave(str(manifest), "app", str(tmp_path / "cache"))
    assert not isinstance(failed, dict) and "doit runtime_image" in str(failed)


def test_without_an_aarch64_odyn_image_resolve_names_the_task(tmp_path: Path) -> None:
    manifest = _enclave(tmp_path, "arm64")
    _fake_default(tmp_path / "cache", "x86_64")  # an x86_64 odyn must never be taken instead
    result = resolve_enclave(str(manifest), "app", str(tmp_path / "cache"))
    assert isinstance(result, TaskFailed)
    text = str(result)
    assert "aarch64 odyn image has not been built" in text and "doit odyn_image_aarch64" in text, text


def test_an_odyn_image_of_another_architecture_is_refused(tmp_path: Path) -> None:
    make_layout(str(tmp_path / "odyn"), "x86", [[Entry.file(ODYN_PATH.lstrip("/"), b"\x7fELF", 0o755)]],
                arch="amd64", cmd=())
    manifest = _enclave(tmp_path, "arm64", odyn="oci:odyn:x86")
    result = resolve_enclave(str(manifest), "app", str(tmp_path / "cache"))
    assert isinstance(result, TaskFailed)
    text = str(result)
    assert "the odyn image is x86_64 but the app is aarch64" in text and "sources.odyn" in text, text


def test_package_drift_names_each_moved_package() -> None:
    measured = cross.measured_packages().read_text()
    listed = "".join(line + "\n" for line in measured.splitlines() if not line.startswith("#"))
    assert cross.package_drift(listed) == []
    moved = listed.replace("libssl3=", "libssl3=9:").replace("scons=", "scons-gone=")
    drift = cross.package_drift(moved)
    assert any(d.startswith("libssl3 ") and "→ 9:" in d for d in drift)
    assert any(d.startswith("scons ") and d.endswith("→ absent") for d in drift)
    assert any(d.startswith("scons-gone absent → ") for d in drift)


def test_the_host_check_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(InvalidInput, match="needs root"):
        cross.check_host()


# --- the real build, under qemu ---------------------------------------------------------------------

BUILD = os.environ.get("ENC_TEST_AARCH64") == "1"
needs_build = pytest.mark.skipif(not BUILD, reason="set ENC_TEST_AARCH64=1 (root, qemu-user + binfmt; ~8 min)")


@pytest.fixture(scope="module")
def aarch64_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from enclaver_rules.rules.odyn import build_odyn_image_aarch64

    cache = tmp_path_factory.mktemp("aarch64-cache")
    result = build_odyn_image_aarch64(str(cache))
    assert isinstance(result, dict), result
    return cache


def _binary(cache: Path) -> bytes:
    record = json.loads(record_path(str(cache), "aarch64").read_text())
    store = Store(cache)
    image = load_stored(store, DEFAULT_TAGS["aarch64"], Digest.parse(record["digest"]))
    assert image.config.platform.architecture == "arm64"
    with tarfile.open(fileobj=io.BytesIO(store.read(image.manifest.layers[0].digest))) as tar:
        member = tar.extractfile(ODYN_PATH.lstrip("/"))
        assert member is not None
        data = member.read()
    assert data[:4] == b"\x7fELF" and data[18:20] == b"\xb7\x00"  # e_machine EM_AARCH64
    assert record["binary"]["size"] == len(data)
    return data


@needs_build
def test_two_aarch64_builds_give_the_same_image(aarch64_cache: Path, tmp_path: Path) -> None:
    """The second build reuses the root (kept in the cache's odyn-build directory) in another cache."""
    from enclaver_rules.rules.odyn import build_odyn_image_aarch64

    other = tmp_path / "cache"
    (other / "odyn-build").mkdir(parents=True)
    root = cross.root_path(aarch64_cache / "odyn-build")
    (other / "odyn-build" / root.name).symlink_to(root)
    result = build_odyn_image_aarch64(str(other))
    assert isinstance(result, dict), result
    first = json.loads(record_path(str(aarch64_cache), "aarch64").read_text())
    assert result == first
    _binary(aarch64_cache)


def _bare_root(tmp_path: Path, odyn: bytes, app: bytes) -> Path:
    """An arm64 root with no libc: odyn, one static program, /proc, /dev/null and odyn's unpack dir."""
    bare = tmp_path / "bare"
    for d in ("proc", "dev", "var/lib/odyn", "run/odyn"):
        (bare / d).mkdir(parents=True)
    (bare / "dev" / "null").touch()
    for name, data in (("odyn", odyn), ("app", app)):
        (bare / name).write_bytes(data)
        (bare / name).chmod(0o755)
    return bare


def _in_bare(bare: Path, *argv: str) -> subprocess.Popen[bytes]:
    script = (f'mount -t proc proc {bare}/proc && mount --bind /dev/null {bare}/dev/null && '
              f'TMPDIR=/var/lib/odyn exec chroot {bare} "$@"')
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", script, "sh",
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@needs_build
def test_the_aarch64_binary_runs_with_no_libc_and_refuses_an_unconfined_app(aarch64_cache: Path,
                                                                            tmp_path: Path) -> None:
    """`odyn --help` runs. A supervised app cannot start under qemu-user, which refuses seccomp
    (prctl(PR_SET_SECCOMP) → EINVAL): odyn then reports fatal over its transport and never runs the
    app unconfined. Everything up to that point (transport, status, log ring) is the aarch64 binary."""
    root = cross.root_path(aarch64_cache / "odyn-build")
    (root / "tmp" / "app.c").write_text('#include <stdio.h>\nint main(void){puts("from aarch64");return 3;}\n')
    subprocess.run(["chroot", str(root), "musl-gcc", "-static", "-Os", "-o", "/tmp/app", "/tmp/app.c"], check=True)
    bare = _bare_root(tmp_path, _binary(aarch64_cache), (root / "tmp" / "app").read_bytes())
    help_ = _in_bare(bare, "/odyn", "--help")
    out, err = help_.communicate(timeout=120)
    assert help_.returncode == 0, err
    assert b"enclaver's in-enclave supervisor" in out
    odyn = _in_bare(bare, "/odyn", "--no-bootstrap", "--transport", "unix:/run/odyn", "--cid", "16", "--linger", "3",
                    "--", "/app")
    deadline = time.monotonic() + 60
    while len(list((bare / "run" / "odyn").glob("*.sock"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    lines, logs = asyncio.run(collect(bare / "run" / "odyn"))
    assert odyn.wait(60) == 108
    assert lines[-1]["status"] == "fatal" and "cannot start the app confined" in str(lines[-1]["error"]), lines
    assert b"from aarch64" not in logs
