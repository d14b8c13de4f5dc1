"""The runtime image: `enclaver-run` (static) as the entry point and the default base of release images, so
`docker run --device /dev/nitro_enclaves … RELEASE` needs no arguments.

With the real Docker engine: the hello release image runs with no arguments, reaches nitro-cli (a
stand-in, a busybox shell script named as such, mounted into the container: the image carries no
nitro-cli) with the EIF in /enclave and the manifest's resources, prints the CID, and a `docker stop`
terminates the enclave and exits 109. Without nitro-cli or the device it says what is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import docker
import pytest

import enclaver_rules
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import docker_archive, load_stored
from enclaver_rules.odyn_image.runtime_image import DEFAULT_TAG, RUN_PATH
from pipeline import doit

BUSYBOX = Path("/bin/busybox")
ENCLAVE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
#: A stand-in for AWS's nitro-cli, NOT nitro-cli: shell builtins only (the image has no other programs).
STANDIN = r"""#!/bin/busybox sh
# nitro-cli-standin (shell): records its arguments, answers as nitro-cli 1.5 would
echo "$*" >> /standin/calls
case "$1" in
run-enclave)
  echo '{"EnclaveName": "hello", "EnclaveID": "@ID@", "ProcessID": 42, "EnclaveCID": 16, "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 512}'
  echo "Started enclave with enclave-cid: 16, memory: 512 MiB, cpu-ids: [1, 3]" >&2 ;;
describe-enclaves)
  if [ -e /standin/terminated ]; then echo "[]"; else
  echo '[{"EnclaveName": "hello", "EnclaveID": "@ID@", "ProcessID": 42, "EnclaveCID": 16, "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 512, "State": "RUNNING", "Flags": "NONE"}]'; fi ;;
terminate-enclave)
  : > /standin/terminated
  echo '{"EnclaveName": "hello", "EnclaveID": "@ID@", "Terminated": true}' ;;
*) echo "nitro-cli-standin: unexpected $*" >&2; exit 100 ;;
esac
""".replace("@ID@", ENCLAVE_ID)


@pytest.fixture(scope="module")
def built(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runtime") / "repo"
    shutil.copytree(template, root, symlinks=True)
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "examples", root / "examples",
                    ignore=shutil.ignore_patterns("image", "blobs-dev", "__pycache__"))
    result = doit(root, "build:hello")
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def release(root: Path) -> tuple[Store, dict[str, object]]:
    summary = json.loads((root / "cache" / "out" / "hello" / "latest" / "build.json").read_text())
    return Store(root / "cache"), summary


def runtime_record(root: Path) -> dict[str, object]:
    return json.loads((root / "cache" / "out" / "runtime" / "image.json").read_text())  # type: ignore[no-any-return]


def test_the_release_image_is_built_on_the_runtime_image(built: Path) -> None:
    store, summary = release(built)
    runtime = runtime_record(built)
    image = load_stored(store, "release", Digest.parse(str(summary["release_image"])))
    base = load_stored(store, DEFAULT_TAG, Digest.parse(str(runtime["digest"])))
    assert summary["sleeve"] == runtime["digest"]
    assert image.config.entrypoint == [RUN_PATH] and not image.config.cmd
    assert image.manifest.layers[0] == base.manifest.layers[0]  # the binary's layer, then /enclave
    assert len(image.manifest.layers) == len(base.manifest.layers) + 1
    assert image.config.labels["dev.enclaver.sleeve.digest"] == runtime["digest"]
    binary = built / "cache" / "odyn-build" / "enclaver-run"
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == runtime["binary"]["sha256"]  # type: ignore[index]


def test_the_binary_refuses_to_run_without_the_nitro_device(built: Path) -> None:
    binary = built / "cache" / "odyn-build" / "enclaver-run"
    shown = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--sim-host" not in shown.stdout and "[EIF|DIR]" in shown.stdout
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"enclaver-run (enclaver {enclaver_rules.__version__})"  # no package metadata inside
    ran = subprocess.run([str(binary), str(built / "cache" / "out" / "hello" / "latest")], capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 2, ran.stderr
    assert "no /dev/nitro_enclaves" in ran.stderr and "--device /dev/nitro_enclaves" in ran.stderr


@pytest.fixture(scope="module")
def loaded(built: Path, dockerd) -> str:  # type: ignore[no-untyped-def]
    from enclaver_rules.oci.engine import Engine

    store, summary = release(built)
    tag = "enclaver-test/hello:release"
    Engine(dockerd.host).load(docker_archive(load_stored(store, tag, Digest.parse(str(summary["release_image"]))),
                                             store, tag))
    return tag


def _run(client, image: str, standin_dir: Path | None, **kw):  # type: ignore[no-untyped-def]
    volumes = {}
    if standin_dir is not None:
        volumes = {str(BUSYBOX): {"bind": "/bin/busybox", "mode": "ro"},
                   str(standin_dir / "nitro-cli"): {"bind": "/usr/bin/nitro-cli", "mode": "ro"},
                   str(standin_dir): {"bind": "/standin", "mode": "rw"}}
    return client.containers.run(image, detach=True, network_mode="none", volumes=volumes,
                                 devices=["/dev/null:/dev/nitro_enclaves:rw"], **kw)


def _logs(container) -> str:  # type: ignore[no-untyped-def]
    return container.logs(stdout=True, stderr=True).decode(errors="replace")  # type: ignore[no-any-return]


def test_docker_run_of_the_release_needs_no_arguments(loaded: str, dockerd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    standin_dir = tmp_path / "standin"
    standin_dir.mkdir()
    (standin_dir / "nitro-cli").write_text(STANDIN)
    (standin_dir / "nitro-cli").chmod(0o755)
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    container = _run(client, loaded, standin_dir)
    try:
        deadline = time.monotonic() + 60
        while "CID 16" not in _logs(container) and time.monotonic() < deadline:
            container.reload()
            assert container.status in ("created", "running"), _logs(container)
            time.sleep(0.2)
        logs = _logs(container)
        assert f"started enclave {ENCLAVE_ID}, CID 16" in logs, logs
        assert "publishing ingress 0.0.0.0:8080:8080" in logs, logs
        assert "allocator: the host's /etc/nitro_enclaves/allocator.yaml must reserve at least" in logs, logs
        calls = (standin_dir / "calls").read_text().splitlines()
        assert calls[0].split() == ["run-enclave", "--cpu-count", "2", "--memory", "512", "--eif-path",
                                    "/enclave/application.eif", "--enclave-name", "hello"], calls
        container.stop(timeout=30)  # SIGTERM: the enclave is terminated and the run drains
        assert container.wait(timeout=60)["StatusCode"] == 109, _logs(container)
        calls = (standin_dir / "calls").read_text().splitlines()
        assert ["terminate-enclave", "--enclave-id", ENCLAVE_ID] in [c.split() for c in calls], calls
    finally:
        container.remove(force=True)
        client.close()


def test_without_nitro_cli_the_release_says_what_is_missing(loaded: str, dockerd) -> None:  # type: ignore[no-untyped-def]
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    container = _run(client, loaded, None)
    try:
        code = container.wait(timeout=120)["StatusCode"]
        logs = _logs(container)
        assert code == 1 and "nitro-cli not found" in logs and "dnf install aws-nitro-enclaves-cli" in logs, logs
    finally:
        container.remove(force=True)
        client.close()


def test_the_runtime_layer_holds_the_binary_and_a_writable_tmp(built: Path) -> None:
    store = Store(built / "cache")
    runtime = runtime_record(built)
    image = load_stored(store, DEFAULT_TAG, Digest.parse(str(runtime["digest"])))
    with store.open(image.manifest.layers[0].digest) as blob, tarfile.open(fileobj=io.BytesIO(blob.read())) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers()}
    assert members[RUN_PATH.lstrip("/")].mode == 0o755
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
