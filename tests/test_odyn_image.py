"""The static odyn binary and the default odyn image: reproducible, and running an app in images
with no libc (busybox-static, and a scratch-like image holding nothing but odyn and one static
program), under a real Docker engine, with the exit code, status and logs carried out."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import docker
import pytest
from test_odyn_supervisor import collect

from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.engine import Engine
from enclaver_rules.oci.layer import Entry, write_layer
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.mutate import ConfigEdit, edit_image
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import docker_archive, load_stored
from enclaver_rules.odyn_image.image import DEFAULT_TAG, ODYN_PATH

BUSYBOX = Path("/bin/busybox")


def _record(cache: Path) -> dict[str, object]:
    return json.loads((cache / "out" / "odyn" / "image.json").read_text())  # type: ignore[no-any-return]


def test_the_image_holds_one_static_binary_and_is_labelled(odyn_cache: Path) -> None:
    record = _record(odyn_cache)
    store = Store(odyn_cache)
    image = load_stored(store, DEFAULT_TAG, Digest.parse(str(record["digest"])))
    assert store.resolve(DEFAULT_TAG) is not None
    assert image.config.entrypoint == [ODYN_PATH]
    assert "TMPDIR=/var/lib/odyn" in image.config.env and "ODYN_APP_TMPDIR=" in image.config.env
    labels = image.config.labels
    binary = record["binary"]
    assert isinstance(binary, dict)
    assert labels["dev.enclaver.odyn.binary.sha256"] == binary["sha256"]
    [layer] = image.manifest.layers
    with tarfile.open(fileobj=io.BytesIO(store.read(layer.digest))) as tar:
        names = {m.name: m for m in tar.getmembers()}
        data = tar.extractfile(names[ODYN_PATH.lstrip("/")]).read()  # type: ignore[union-attr]
    assert data[:4] == b"\x7fELF" and len(data) == binary["size"]
    assert names["var/lib/odyn"].mode == 0o700
    # no interpreter to find at run time: statically linked (no PT_INTERP program header)
    assert b"/lib64/ld-linux" not in data[:4096]


def test_two_builds_give_the_same_image_digest(odyn_cache: Path, tmp_path: Path) -> None:
    """Every enclave's PCRs depend on odyn: a second, independent build (another cache, another
    process with another environment) must give the very same bytes."""
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LC_ALL": "C", "LANG": "C",  # a different caller:
           "PATH": f"{tmp_path}:{os.environ['PATH']}", "VIRTUAL_ENV": str(tmp_path)}  # nothing of it may leak
    subprocess.run([sys.executable, "-c", "import sys; from enclaver_rules.rules.odyn import build_odyn_image; "
                    "build_odyn_image(sys.argv[1])", str(tmp_path / "cache")], env=env, check=True, cwd=tmp_path,
                   capture_output=True)
    assert _record(tmp_path / "cache") == _record(odyn_cache)


def _run_with_odyn(odyn_cache: Path, dockerd, tmp_path: Path, extra: list[Entry], tag: str,  # type: ignore[no-untyped-def]
                   app: list[str]) -> tuple[int, list[dict[str, object]], bytes]:
    """odyn's image plus one layer, loaded into the engine and run with the app; the test is the
    host side over the Unix transport, through a bind-mounted directory."""
    store = Store(odyn_cache)
    odyn = load_stored(store, DEFAULT_TAG, Digest.parse(str(_record(odyn_cache)["digest"])))
    buf = io.BytesIO()
    layer = write_layer(extra, buf)
    store.put_bytes(buf.getvalue(), layer.digest)
    edited = edit_image(odyn.manifest, odyn.config, layers=[layer], edit=ConfigEdit(
        cmd=("--transport", "unix:/run/odyn", "--cid", "16", "--linger", "3", "--", *app)))
    store.put_bytes(edited.config, edited.config_digest)
    store.put_bytes(edited.manifest, edited.manifest_digest)
    store.tag(tag, Descriptor("application/vnd.oci.image.manifest.v1+json", edited.manifest_digest,
                              len(edited.manifest)))
    image = load_stored(store, tag, edited.manifest_digest)
    Engine(dockerd.host).load(docker_archive(image, store, tag))
    sockets = tmp_path / "vsock"
    sockets.mkdir()
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        container = client.containers.run(tag, detach=True, network_mode="none",
                                           volumes={str(sockets): {"bind": "/run/odyn", "mode": "rw"}})
        try:
            lines, logs = asyncio.run(collect(sockets))
            code = container.wait(timeout=60)["StatusCode"]
        finally:
            container.remove(force=True)
    finally:
        client.close()
    return code, lines, logs


def test_odyn_runs_an_app_in_busybox_static_and_returns_its_exit_code(odyn_cache: Path, dockerd,  # type: ignore[no-untyped-def]
                                                                      tmp_path: Path) -> None:
    assert BUSYBOX.is_file(), "busybox-static is missing: apt-get install busybox-static (README command (b))"
    layer = [Entry.file("bin/busybox", BUSYBOX.read_bytes(), 0o755), Entry.symlink("bin/sh", "busybox"),
             Entry.symlink("bin/env", "busybox"), Entry.symlink("bin/grep", "busybox"), Entry.dir("tmp", 0o1777)]
    script = ('echo "tmpdir=[$TMPDIR] ld=[$LD_LIBRARY_PATH]"; echo "loader vars: $(env | grep -c -E '
              "'STATICX|_PYI|_MEI|ODYN_APP')\"; exit 42")
    code, lines, logs = _run_with_odyn(odyn_cache, dockerd, tmp_path, layer, "enclaver-test/odyn-busybox:1",
                                       ["/bin/sh", "-c", script])
    assert code == 42, logs
    assert lines[-1] == {"status": "exited", "code": 42}
    assert b"tmpdir=[] ld=[]\n" in logs and b"loader vars: 0\n" in logs  # the app sees its own environment


def test_odyn_runs_in_a_scratch_like_image_with_nothing_but_one_static_program(odyn_cache: Path, dockerd,  # type: ignore[no-untyped-def]
                                                                              tmp_path: Path) -> None:
    layer = [Entry.file("busybox", BUSYBOX.read_bytes(), 0o755)]  # no /bin, no /etc, no /tmp, no libc
    code, lines, logs = _run_with_odyn(odyn_cache, dockerd, tmp_path, layer, "enclaver-test/odyn-scratch:1",
                                       ["/busybox", "sh", "-c", "echo from scratch; exit 3"])
    assert code == 3, logs
    assert lines[-1] == {"status": "exited", "code": 3} and b"from scratch\n" in logs


def test_a_missing_build_tool_fails_the_task_with_the_package_to_install(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fresh Debian, staticx's "objdump is required" surfaced as a traceback under doit and as
    31 errors under pytest; now the task fails before any download, naming the package."""
    import shutil

    from doit.exceptions import TaskFailed

    from enclaver_rules.odyn_image import build
    from enclaver_rules.rules.odyn import build_odyn_image

    real_which = shutil.which
    monkeypatch.setattr(build.shutil, "which", lambda name, **kw: None if name == "objdump" else real_which(name, **kw))
    result = build_odyn_image(str(tmp_path))
    assert isinstance(result, TaskFailed)
    assert "objdump not found" in str(result) and "apt-get install binutils" in str(result)
    assert "Traceback" not in str(result)


def test_a_python_without_shared_libpython_is_named(tmp_path: Path) -> None:
    from enclaver_rules.errors import InvalidInput
    from enclaver_rules.odyn_image.build import check_tools

    fake = tmp_path / "python3"  # a Python whose sysconfig names a library that does not exist
    fake.write_text("#!/bin/sh\ncase \"$2\" in *platform*) echo 3.11.2;; *) echo /nonexistent/libpython3.11.so.1.0;; esac\n")
    fake.chmod(0o755)
    with pytest.raises(InvalidInput, match=r"apt-get install libpython3\.11"):
        check_tools(str(fake), "/usr/bin:/bin")
