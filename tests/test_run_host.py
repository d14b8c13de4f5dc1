"""The host side of `enclaver run` (runtime/run.py) against odyn as a real local process over the Unix
transport: status, logs, exit codes, a stop that drains, ingress, and egress through `--sim-host`."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclaver_rules.errors import InvalidInput
from enclaver_rules.link.status import Status
from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.manifest.load import load_manifest
from enclaver_rules.runtime.egress_host import HostEgress
from enclaver_rules.runtime.run import EXIT_INTERRUPTED, HostSide, LinePrefixer, Publish, check_publish, run
from sim_helpers import http_page

ENCLAVE_CID = 16


class Odyn:
    """A started 'enclave': odyn as a process; stop is SIGTERM, as docker stop does to the simulator."""

    def __init__(self, directory: Path, config: Path, app: list[str]) -> None:
        self.cid = ENCLAVE_CID
        self.process = subprocess.Popen([sys.executable, "-m", "odyn", "--transport", f"unix:{directory}",
                                         "--cid", str(ENCLAVE_CID), "--no-bootstrap", "--linger", "1",
                                         "--config-dir", str(config), "--", *app])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def gone(self) -> bool:
        return self.process.poll() is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manifest(directory: Path, body: str = "") -> Path:
    config = directory / "config"
    config.mkdir()
    (config / "enclaver.yaml").write_text("version: v1\nname: t\ntarget: example.test/t:1\nsources:\n  app: x:1\n"
                                          + body)
    return config


def host_run(tmp_path: Path, config: Path, app: str, *, publish: tuple[Publish, ...] = (),
             sim_hosts: dict[str, tuple[str, int]] | None = None, outputs_dir: Path | None = None,
             during: object = None) -> tuple[int, bytes, list[Status], list[Odyn]]:
    sockets = tmp_path / "vsock"
    sockets.mkdir()
    loaded, _ = load_manifest(str(config / "enclaver.yaml"))
    out: list[bytes] = []
    statuses: list[Status] = []
    transport = UnixTransport(sockets, 2)
    egress = HostEgress(loaded.egress.policy(), transport, static_hosts=sim_hosts or {}) \
        if loaded.egress.enabled else None
    side = HostSide(transport, loaded, publish, on_log=out.append, on_status=statuses.append, egress=egress,
                    drain_timeout=20, connect_timeout=30,
                    outputs_dir=str(outputs_dir) if outputs_dir else None)
    started: list[Odyn] = []

    def start() -> Odyn:
        started.append(Odyn(sockets, config, [sys.executable, "-c", app]))
        return started[0]

    async def main() -> int:
        task = asyncio.ensure_future(run(side, start, signals=()))
        if callable(during):
            await during(side, out)
        return await asyncio.wait_for(task, 60)

    code = asyncio.run(main())
    assert started and started[0].process.wait(30) is not None
    return code, b"".join(out), statuses, started


def test_the_apps_output_and_exit_code_come_through(tmp_path: Path) -> None:
    config = manifest(tmp_path)
    code, logs, statuses, _ = host_run(tmp_path, config, "import sys; print('hello'); "
                                       "print('oops', file=sys.stderr); sys.exit(3)")
    assert code == 3
    assert b"hello\n" in logs and b"oops\n" in logs
    assert statuses[-1] == Status("exited", code=3)


def test_a_signal_death_is_107_and_an_odyn_failure_108(tmp_path: Path) -> None:
    config = manifest(tmp_path)
    code, _, statuses, _ = host_run(tmp_path, config, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert code == 107 and statuses[-1].state == "signaled"
    bad = tmp_path / "bad"
    bad.mkdir()
    config = manifest(bad, "api:\n  listen_port: 9999\n")  # no NSM here: odyn must refuse to start the app
    code, logs, statuses, _ = host_run(bad, config, "print('never')")
    assert code == 108 and statuses[-1].state == "fatal" and b"never" not in logs


def test_a_stop_drains_final_status_and_logs_then_109(tmp_path: Path) -> None:
    config = manifest(tmp_path)
    app = ("import signal, sys, time\n"
           "def stop(*_):\n print('graceful', flush=True); sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)\n")

    async def during(side: HostSide, out: list[bytes]) -> None:
        while b"ready" not in b"".join(out):
            await asyncio.sleep(0.05)
        side.stop()

    code, logs, statuses, started = host_run(tmp_path, config, app, during=during)
    assert code == EXIT_INTERRUPTED
    assert statuses[-1] == Status("exited", code=0) and b"graceful\n" in logs
    assert started[0].process.wait(30) == 0


def test_ingress_reaches_the_app_through_the_enclaves_port(tmp_path: Path) -> None:
    port, host_port = free_port(), free_port()
    config = manifest(tmp_path, f"ingress:\n  - listen_port: {port}\n")
    app = ("import socket\n"
           f"s = socket.create_server(('127.0.0.1', {port}))\nprint('listening', flush=True)\n"
           "c, _ = s.accept()\ndata = c.recv(100)\nc.sendall(b'echo:' + data)\nc.close()\n")

    async def during(side: HostSide, out: list[bytes]) -> None:
        while b"listening" not in b"".join(out):
            await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 20) == b"echo:ping"
        writer.close()

    code, *_ = host_run(tmp_path, config, app, publish=(Publish(host_port, port, "127.0.0.1"),), during=during)
    assert code == 0


@pytest.fixture
def stand_in() -> Iterator[int]:
    with http_page(b"from the stand-in") as port:
        yield port


def test_egress_reaches_a_sim_host_stand_in_and_the_policy_still_refuses(tmp_path: Path, stand_in: int) -> None:
    config = manifest(tmp_path, "egress:\n  allow:\n    - s3.example.test\n  deny:\n    - denied.example.test\n")
    app = ("import urllib.request, urllib.error\n"
           "print(urllib.request.urlopen('http://s3.example.test/', timeout=20).read().decode(), flush=True)\n"
           "for url in ('http://denied.example.test/', 'http://other.example.test/'):\n"
           "    try:\n        urllib.request.urlopen(url, timeout=20)\n        print('reached', url)\n"
           "    except urllib.error.HTTPError as e:\n        print('refused', e.code, flush=True)\n")
    code, logs, *_ = host_run(tmp_path, config, app, sim_hosts={
        "s3.example.test": ("127.0.0.1", stand_in), "denied.example.test": ("127.0.0.1", stand_in)})
    assert code == 0, logs
    assert b"from the stand-in\n" in logs
    assert b"reached" not in logs and logs.count(b"refused 403") == 2, logs


def test_publish_parsing_and_ports_the_manifest_does_not_list(tmp_path: Path) -> None:
    assert Publish.parse("8080:80") == Publish(8080, 80)
    assert Publish.parse("127.0.0.1:9000:8080") == Publish(9000, 8080, "127.0.0.1")
    assert Publish.parse("[::1]:9000:8080").host_ip == "::1"
    for bad in ("80", "a:b", "0:80", "70000:80", "1.2.3.4:5"):
        with pytest.raises(InvalidInput):
            Publish.parse(bad)
    loaded, _ = load_manifest(str(manifest(tmp_path, "ingress:\n  - listen_port: 8080\n") / "enclaver.yaml"))
    check_publish(loaded, (Publish(1, 8080),))
    with pytest.raises(InvalidInput, match="does not list 9090"):
        check_publish(loaded, (Publish(1, 9090),))


def test_log_lines_can_be_prefixed() -> None:
    out: list[bytes] = []
    prefix = LinePrefixer(b"hello| ", out.append)
    prefix(b"one\ntw")
    prefix(b"o\nthree")
    prefix.flush()
    assert b"".join(out) == b"hello| one\nhello| two\nhello| three\n"


def test_the_manifests_outputs_are_mirrored_by_the_run(tmp_path: Path) -> None:
    """`enclaver run --outputs-dir`: what the app leaves in an `outputs:` directory is on the host
    when the run ends (odyn's last scan comes before the end of the stream)."""
    inside = tmp_path / "inside" / "results"
    inside.mkdir(parents=True)
    config = manifest(tmp_path, f"outputs:\n  - {inside}\n")
    app = f"open({str(inside / 'answer.txt')!r}, 'w').write('42\\n')"
    code, _, _, _ = host_run(tmp_path, config, app, outputs_dir=tmp_path / "mirror")
    assert code == 0
    assert (tmp_path / "mirror" / str(inside).lstrip("/") / "answer.txt").read_text() == "42\n"
