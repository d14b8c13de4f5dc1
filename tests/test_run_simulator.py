"""`enclaver run --simulate` with the real Docker engine: the hello example end to end, a failing app's
code, SIGTERM draining, and the boundary (no direct TCP, UDP or DNS; the proxy's policy; --sim-host)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from enclaver_rules.oci.layer import Entry
from oci_helpers import make_layout
from pipeline import doit
from sim_helpers import http_page

BUSYBOX = Path("/bin/busybox")
ENCLAVER = [sys.executable, "-m", "enclaver_rules.cli"]
PROBE = r"""
echo probe-start
if nc -w 3 1.1.1.1 80 </dev/null; then echo tcp-direct-OPEN; else echo tcp-direct-refused; fi
if nc -w 3 172.17.0.1 80 </dev/null; then echo tcp-host-OPEN; else echo tcp-host-refused; fi
if nslookup example.com 8.8.8.8 >/dev/null 2>&1; then echo dns-udp-OPEN; else echo dns-udp-refused; fi
ask() { printf 'GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n' "$1" "$1" | nc -w 20 127.0.0.1 10000; }
ask denied.test | head -n 1 | sed 's/^/denied: /'
ask other.test | head -n 1 | sed 's/^/other: /'
ask allowed.test | tail -n 1; echo
echo probe-end
exit 7
"""


#: An app that asks odyn's attestation API for a document over a nonce (busybox nc; the request
#: written by hand) and leaves the answer in /out, which the manifest's outputs: sends to the host.
NONCE_BODY = '{"nonce":"AAECAwQ="}'  # the nonce 00 01 02 03 04
ATTESTER = (r"""
printf 'POST /v1/attestation HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"""
            f"Content-Length: {len(NONCE_BODY)}" r"""\r\n\r\n""" + NONCE_BODY + r"""' \
  | nc -w 20 127.0.0.1 9000 > /out/answer.http
echo attested
""")


@pytest.fixture(scope="module")
def built(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the hello example and a probe enclave (busybox running PROBE), both built."""
    root = tmp_path_factory.mktemp("sim") / "repo"
    shutil_copy = __import__("shutil")
    shutil_copy.copytree(template, root, symlinks=True)
    repo = Path(__file__).resolve().parent.parent
    shutil_copy.copytree(repo / "examples", root / "examples",
                         ignore=shutil_copy.ignore_patterns("image", "blobs-dev", "__pycache__"))
    probe = root / "services" / "probe"
    probe.mkdir(parents=True)
    make_layout(str(probe / "app"), "latest", [[
        Entry.file("bin/busybox", BUSYBOX.read_bytes(), 0o755), Entry.symlink("bin/sh", "busybox"),
        Entry.dir("tmp", 0o1777), Entry.file("probe.sh", PROBE.encode(), 0o755)]], cmd=("/bin/sh", "/probe.sh"))
    (probe / "enclaver.yaml").write_text(
        "version: v1\nname: probe\ntarget: example.test/probe:release\nsources:\n  app: oci:app:latest\n"
        "egress:\n  allow:\n    - allowed.test\n    - denied.test\n  deny:\n    - denied.test\n"
        "defaults:\n  cpu_count: 1\n  memory_mb: 256\nbuild:\n  blobs: ../../blobs\n")
    attester = root / "services" / "attester"
    attester.mkdir(parents=True)
    make_layout(str(attester / "app"), "latest", [[
        Entry.file("bin/busybox", BUSYBOX.read_bytes(), 0o755), Entry.symlink("bin/sh", "busybox"),
        Entry.dir("tmp", 0o1777), Entry.dir("out", 0o755), Entry.file("attest.sh", ATTESTER.encode(), 0o755)]],
        cmd=("/bin/sh", "/attest.sh"))
    (attester / "enclaver.yaml").write_text(
        "version: v1\nname: attester\ntarget: example.test/attester:release\nsources:\n  app: oci:app:latest\n"
        "api:\n  listen_port: 9000\noutputs:\n  - /out\n"
        "defaults:\n  cpu_count: 1\n  memory_mb: 256\nbuild:\n  blobs: ../../blobs\n")
    result = doit(root, "build:hello", "build:probe", "build:attester")
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def enclaver_run(root: Path, dockerd, *args: str) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    env = {**os.environ, "DOCKER_HOST": dockerd.host, "ENC_CACHE_DIR": str(root / "cache"),
           "ENC_SIM_STATE": str(root / "sim-state")}
    return subprocess.Popen([*ENCLAVER, "run", "--simulate", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def containers(dockerd) -> list[object]:  # type: ignore[no-untyped-def]
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        return list(client.containers.list(all=True, filters={"label": "dev.enclaver.simulator"}))
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def stand_in() -> Iterator[int]:
    with http_page(b"stand-in says hi", "0.0.0.0") as port:
        yield port


def test_the_boundary_holds_and_a_failing_apps_code_comes_through(built: Path, dockerd,  # type: ignore[no-untyped-def]
                                                                  stand_in: int) -> None:
    proc = enclaver_run(built, dockerd, "cache/out/probe/latest", "--sim-host", f"allowed.test=127.0.0.1:{stand_in}",
                        "--sim-host", f"denied.test=127.0.0.1:{stand_in}")
    out, err = proc.communicate(timeout=180)
    text = out.decode()
    # a denied name cannot be mapped: refused before anything starts
    assert proc.returncode == 2 and "denied.test" in err.decode() and not containers(dockerd)
    proc = enclaver_run(built, dockerd, "cache/out/probe/latest", "--sim-host", f"allowed.test=127.0.0.1:{stand_in}")
    out, err = proc.communicate(timeout=180)
    text = out.decode()
    assert proc.returncode == 7, text + err.decode()
    assert "sim-host: allowed.test → 127.0.0.1:" in err.decode()
    assert "probe-start" in text and "probe-end" in text
    for line in ("tcp-direct-refused", "tcp-host-refused", "dns-udp-refused", "denied: HTTP/1.1 403",
                 "other: HTTP/1.1 403", "stand-in says hi"):
        assert line in text, text
    assert "OPEN" not in text, text
    assert not containers(dockerd)


def test_attestation_in_the_simulator_carries_the_eifs_pcrs(built: Path, dockerd,  # type: ignore[no-untyped-def]
                                                             cli, tmp_path: Path) -> None:
    """The app in the container asks odyn's API; the simulated NSM (on the host) answers with the
    PCRs of the EIF that was built; the document comes out through outputs: and verifies against
    the simulator's root and the build's measurements, and not against AWS's root."""
    mirror = tmp_path / "mirror"
    proc = enclaver_run(built, dockerd, "cache/out/attester/latest", "--outputs-dir", str(mirror))
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out.decode() + err.decode()
    assert "attested" in out.decode()
    answer = (mirror / "out" / "answer.http").read_bytes()
    head, _, document = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"application/cbor" in head, answer[:300]
    (tmp_path / "doc.cbor").write_bytes(document)
    measurements = built / "cache" / "out" / "attester" / "latest" / "measurements.json"
    root = built / "sim-state" / "root.pem"
    good = cli("attestation", "verify", str(tmp_path / "doc.cbor"), "--root", str(root), "--expect",
               str(measurements), "--nonce", "0001020304")
    assert good.code == 0, good.stdout + good.stderr
    assert cli("attestation", "verify", str(tmp_path / "doc.cbor"), "--expect", str(measurements)).code == 1
    assert not containers(dockerd)


def test_hello_serves_through_ingress_and_sigterm_drains(built: Path, dockerd) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    proc = enclaver_run(built, dockerd, "cache/out/hello/latest", "-p", f"127.0.0.1:{port}:8080", "--log-prefix")
    try:
        deadline = time.monotonic() + 120
        page = b""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
                break
            except OSError:
                time.sleep(0.5)
        assert b"Hello from an enclave." in page
        assert len(containers(dockerd)) == 1
        time.sleep(1)  # the request's log line reaches the host side
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 109, err.decode()
    assert "enclave: running" in err.decode() and "enclave: signaled" in err.decode(), err.decode()
    assert "hello| " in out.decode() and "response:200" in out.decode(), out.decode()  # httpd -v's log, drained
    assert not containers(dockerd)


def test_a_bare_host_without_nitro_suggests_simulate(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if os.path.exists("/dev/nitro_enclaves"):
        pytest.skip("a Nitro host")
    result = cli("run", str(tmp_path / "x.eif"))
    assert result.code == 2 and "--simulate" in result.stderr


def test_verify_before_run_names_the_pcrs_and_starts_nothing(built: Path, cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # nothing may start
    good = json.loads((built / "cache" / "out" / "hello" / "latest" / "measurements.json").read_text())
    wrong = tmp_path / "m.json"
    wrong.write_text(json.dumps({"Measurements": {**good["Measurements"], "PCR2": "ab" * 48}}))
    result = cli("run", "--simulate", str(built / "cache" / "out" / "hello" / "latest"),
                 "--cache-dir", str(built / "cache"), "--verify-before-run", str(wrong))
    assert result.code == 1 and f"PCR2 expected {'ab' * 48} got {good['Measurements']['PCR2']}" in result.stderr
    assert "PCR0" not in result.stderr.split("match")[-1].split("expected")[0]
    result = cli("run", "--simulate", str(built / "cache" / "out" / "hello" / "latest"), "--cache-dir",
                 str(built / "cache"), "-p", "9999:9090")
    assert result.code == 2 and "does not list 9090" in result.stderr


def test_an_image_not_built_by_enclaver_is_refused(built: Path, cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("run", "--simulate", "enclaver/odyn:default", "--cache-dir", str(built / "cache"))
    assert result.code == 2 and "not built by enclaver" in result.stderr


def test_the_nitro_path_drives_nitro_cli_stand_in(built: Path, cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Argument and flow level only: run-enclave's arguments, the CID printed, terminate at the end. The
    vsock host side cannot be tested here (no vsock loopback): the stand-in's enclave never answers."""
    import json

    from enclaver_rules.cli import run as run_cli

    standin = Path(__file__).resolve().parent / "data" / "nitro-cli-standin"
    bindir, state = tmp_path / "bin", tmp_path / "state"
    bindir.mkdir()
    state.mkdir()
    (bindir / "nitro-cli").symlink_to(standin)
    enclave_id = "i-0123456789abcdef0-enc18d6f0a1b2c3d4e5"
    run_json = json.dumps({"EnclaveName": "hello", "EnclaveID": enclave_id, "ProcessID": 4242, "EnclaveCID": 23,
                           "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 512})
    (state / "replies.json").write_text(json.dumps([
        {"stdout": run_json}, {"stdout": "[]"},
        {"stdout": json.dumps({"EnclaveName": "hello", "EnclaveID": enclave_id, "Terminated": True})}]))
    monkeypatch.setenv("NITRO_CLI_STANDIN_DIR", str(state))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(run_cli, "NITRO_DEVICE", str(standin))  # any existing path: "a Nitro host"
    result = cli("run", str(built / "cache" / "out" / "hello" / "latest"), "--cache-dir", str(built / "cache"))
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    assert calls[0][:5] == ["run-enclave", "--cpu-count", "2", "--memory", "512"]
    assert calls[0][calls[0].index("--enclave-name") + 1] == "hello"
    assert calls[-1] == ["terminate-enclave", "--enclave-id", enclave_id]
    assert f"started enclave {enclave_id}, CID 23" in result.stderr
    assert result.code == 1  # the stand-in's enclave ended without a status


def test_the_doit_task_runs_the_latest_build(built: Path, dockerd, stand_in: int) -> None:  # type: ignore[no-untyped-def]
    """`doit run_enclave:NAME -- ARGS…`: enclaver run of the latest build, --simulate added off Nitro hardware, the
    arguments passed through, and the app's failing exit code failing the task."""
    # `--flag=VALUE`: doit takes any argument that does not start with '-' and holds '=' as its own variable
    result = doit(built, "run_enclave:probe", "--", f"--sim-host=allowed.test=127.0.0.1:{stand_in}",
                  env={"DOCKER_HOST": dockerd.host, "ENC_SIM_STATE": str(built / "sim-state")})
    assert result.returncode != 0, result.stdout + result.stderr
    assert "probe-start" in result.stdout and "stand-in says hi" in result.stdout, result.stdout + result.stderr
    assert "run_enclave:probe: enclaver run exited 7" in result.stderr, result.stderr
    assert "sim-host: allowed.test → 127.0.0.1:" in result.stderr
    assert not containers(dockerd)
