"""odyn's supervisor as a real process over the Unix transport, with the test as the host side."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.ports import LOGS_PORT, STATUS_PORT

ENCLAVE_CID = 16


def start_odyn(directory: Path, *app: str, linger: float = 1.5) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "odyn", "--transport", f"unix:{directory}", "--cid",
                             str(ENCLAVE_CID), "--linger", str(linger), "--", *app])


async def _connect(directory: Path, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host = UnixTransport(directory, 2)
    deadline = time.monotonic() + 20
    while True:
        try:
            return await host.connect(ENCLAVE_CID, port)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def collect(directory: Path) -> tuple[list[dict[str, object]], bytes]:
    """Every status line until the final one, and the whole log until end-of-stream. The writers stay
    referenced: since Python 3.11.5 a garbage-collected StreamWriter closes its connection."""
    (status_r, _status_w), (logs_r, _logs_w) = await asyncio.gather(_connect(directory, STATUS_PORT), _connect(directory, LOGS_PORT))
    lines = [json.loads(line) for line in (await asyncio.wait_for(status_r.read(), 30)).splitlines()]
    logs = await asyncio.wait_for(logs_r.read(), 30)  # returns only at the half-close
    return lines, logs


def run(directory: Path, app: str) -> tuple[int, list[dict[str, object]], bytes]:
    odyn = start_odyn(directory, sys.executable, "-c", app)
    lines, logs = asyncio.run(collect(directory))
    return odyn.wait(30), lines, logs


def test_exit_code_status_and_logs_with_end_of_stream(tmp_path: Path) -> None:
    code, lines, logs = run(tmp_path, "import sys; print('hello'); print('oops', file=sys.stderr); sys.exit(3)")
    assert code == 3
    assert lines[-1] == {"status": "exited", "code": 3}
    assert [line["status"] for line in lines][:1] in (["starting"], ["running"])
    assert b"hello\n" in logs and b"oops\n" in logs


def test_a_late_reader_gets_the_ring_and_the_end(tmp_path: Path) -> None:
    odyn = start_odyn(tmp_path, sys.executable, "-c", "print('early bird')", linger=3)

    async def late() -> bytes:
        await asyncio.sleep(1.0)  # the app has long exited
        reader, _logs_w = await _connect(tmp_path, LOGS_PORT)
        return await asyncio.wait_for(reader.read(), 20)

    assert asyncio.run(late()) == b"early bird\n"
    assert odyn.wait(30) == 0


def test_sigterm_is_forwarded_for_a_graceful_stop(tmp_path: Path) -> None:
    # the handler writes with os.write: a print from a handler that lands inside print('ready') is
    # a reentrant call into the same buffered stdout (RuntimeError), which made this test flaky
    app = ("import os, signal, sys, time\n"
           "def stop(*_):\n os.write(1, b'graceful\\n'); sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    odyn = start_odyn(tmp_path, sys.executable, "-c", app)

    async def scenario() -> tuple[list[dict[str, object]], bytes]:
        reader, _logs_w = await _connect(tmp_path, LOGS_PORT)
        assert await asyncio.wait_for(reader.readline(), 20) == b"ready\n"
        odyn.send_signal(signal.SIGTERM)
        status_r, _status_w = await _connect(tmp_path, STATUS_PORT)
        lines = [json.loads(x) for x in (await asyncio.wait_for(status_r.read(), 20)).splitlines()]
        return lines, await asyncio.wait_for(reader.read(), 20)

    lines, rest = asyncio.run(scenario())
    assert lines[-1] == {"status": "exited", "code": 0} and b"graceful\n" in rest
    assert odyn.wait(30) == 0


def test_a_signal_death_is_reported_and_mapped_to_107(tmp_path: Path) -> None:
    code, lines, _ = run(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert lines[-1] == {"status": "signaled", "signal": 9, "name": "SIGKILL"}
    assert code == 107


def test_odyn_failure_is_reported_not_silent(tmp_path: Path) -> None:
    odyn = start_odyn(tmp_path, "/nonexistent/app")
    lines, logs = asyncio.run(collect(tmp_path))
    assert lines[-1]["status"] == "fatal" and "nonexistent" in str(lines[-1]["error"])
    assert b"odyn: fatal:" in logs
    assert odyn.wait(30) == 108


def test_orphans_are_adopted_and_reaped_and_the_app_decides(tmp_path: Path) -> None:
    app = ("import subprocess, sys\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.3)'])\n"  # left behind
           "print(child.pid, flush=True)\n"
           "sys.exit(5)\n")
    odyn = start_odyn(tmp_path, sys.executable, "-c", app, linger=2)
    lines, logs = asyncio.run(collect(tmp_path))
    orphan = int(logs.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{orphan}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # odyn (a subreaper here, PID 1 in an enclave) adopted the orphan and reaped it: no zombie remains
    assert not Path(f"/proc/{orphan}").exists()
    assert odyn.wait(30) == 5 and lines[-1] == {"status": "exited", "code": 5}


def test_bad_arguments_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "odyn", "--transport", "unix:/tmp"], capture_output=True)
    assert result.returncode == 2 and b"give the app after --" in result.stderr


APP_WITH_NETWORK = r"""
import http.server, os, sys, threading, urllib.request
origin, port = sys.argv[1], int(sys.argv[2])
# egress: through the proxy odyn put in our environment, to the parent ("host")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": os.environ["HTTP_PROXY"]}))
print("egress:", opener.open(f"http://host:{origin}/", timeout=20).read().decode().strip(), flush=True)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("proxy=" + os.environ["HTTP_PROXY"] + " no_proxy=" + os.environ["NO_PROXY"]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
        threading.Thread(target=server.shutdown).start()
    def log_message(self, *a): pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
server.serve_forever()
"""


def test_manifest_drives_egress_proxy_env_and_ingress(tmp_path: Path) -> None:
    from enclaver_rules.policy import EgressPolicy
    from enclaver_rules.runtime.egress_host import HostEgress
    from services import free_port

    ingress_port, proxy_port = free_port(), free_port()
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "enclaver.yaml").write_text(
        f"version: v1\nname: app\ntarget: t\nsources: {{app: a}}\ningress:\n  - listen_port: {ingress_port}\n"
        f"egress:\n  proxy_port: {proxy_port}\n  allow: [host]\n")
    sockets = tmp_path / "vsock"
    sockets.mkdir()

    async def main() -> tuple[int, bytes, bytes]:
        async def origin_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\nConnection: close\r\n\r\nhello from parent")
            await writer.drain()
            writer.close()

        origin = await asyncio.start_server(origin_handler, "127.0.0.1", 0)
        host_side = await HostEgress(EgressPolicy.from_lists(["host"]), UnixTransport(sockets, 2)).serve()
        odyn = subprocess.Popen([sys.executable, "-m", "odyn", "--config-dir", str(config), "--transport",
                                 f"unix:{sockets}", "--cid", str(ENCLAVE_CID), "--linger", "1", "--",
                                 sys.executable, "-c", APP_WITH_NETWORK, str(origin.sockets[0].getsockname()[1]),
                                 str(ingress_port)])
        logs_reader, _logs_w = await _connect(sockets, LOGS_PORT)
        answer = b""
        deadline = time.monotonic() + 30
        while b"200 OK" not in answer and time.monotonic() < deadline:  # until the app listens
            reader, writer = await _connect(sockets, ingress_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 20)
            writer.close()
            await asyncio.sleep(0.1)
        logs = await asyncio.wait_for(logs_reader.read(), 30)
        code = await asyncio.get_running_loop().run_in_executor(None, odyn.wait, 30)
        host_side.close()
        origin.close()
        return code, answer, logs

    code, answer, logs = asyncio.run(main())
    assert code == 0, logs
    assert f"proxy=http://127.0.0.1:{proxy_port}/ no_proxy=localhost,127.0.0.1".encode() in answer
    assert b"egress: hello from parent" in logs


def test_a_broken_manifest_is_reported_on_the_status_stream(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "enclaver.yaml").write_text("version: v9\n")
    odyn = subprocess.Popen([sys.executable, "-m", "odyn", "--config-dir", str(config), "--transport",
                             f"unix:{tmp_path}", "--cid", str(ENCLAVE_CID), "--linger", "1.5", "--", "/bin/true"])
    lines, logs = asyncio.run(collect(tmp_path))
    assert lines[-1]["status"] == "fatal" and "version: 'v9' is not supported" in str(lines[-1]["error"])
    assert b"odyn: fatal:" in logs and b"enclaver.yaml:1:10" in logs  # file, line and column, as everywhere
    assert odyn.wait(30) == 108


LEAVES_AT_ONCE = r"""
import os, socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
conn, _ = server.accept()
conn.recv(100)
conn.sendall(b"x" * int(sys.argv[2]))
os._exit(0)  # at once: the response is still in buffers on its way out
"""


def test_responses_in_flight_are_delivered_before_odyn_reports_the_exit(tmp_path: Path) -> None:
    """Upstream cuts responses off at exit. Here the client reads only after the app has gone, with
    no linger at all: the flush alone must carry all 8 MiB out before the final status."""
    from services import free_port

    port = free_port()
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "enclaver.yaml").write_text(
        f"version: v1\nname: app\ntarget: t\nsources: {{app: a}}\ningress:\n  - listen_port: {port}\n")
    sockets = tmp_path / "vsock"
    sockets.mkdir()
    odyn = subprocess.Popen([sys.executable, "-m", "odyn", "--config-dir", str(config), "--transport",
                             f"unix:{sockets}", "--cid", str(ENCLAVE_CID), "--linger", "0", "--flush-timeout", "20",
                             "--", sys.executable, "-c", LEAVES_AT_ONCE, str(port), str(8 << 20)])

    async def main() -> tuple[int, list[dict[str, object]]]:
        logs_r, _logs_w = await _connect(sockets, LOGS_PORT)
        status_r, _status_w = await _connect(sockets, STATUS_PORT)
        first = await asyncio.wait_for(logs_r.readline(), 20)
        assert first == b"listening\n", first
        reader, writer = await _connect(sockets, port)
        writer.write(b"GET\n")
        await asyncio.sleep(1.0)  # the app exits meanwhile; most of the answer is still queued
        received = 0
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 20):
            received += len(chunk)
        lines = [json.loads(x) for x in (await asyncio.wait_for(status_r.read(), 20)).splitlines()]
        return received, lines

    received, lines = asyncio.run(main())
    assert received == 8 << 20
    assert lines[-1] == {"status": "exited", "code": 0}
    assert odyn.wait(30) == 0


def _ingress_config(tmp_path: Path, port: int, extra: str = "") -> tuple[Path, Path]:
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "enclaver.yaml").write_text(
        f"version: v1\nname: app\ntarget: t\nsources: {{app: a}}\ningress:\n  - listen_port: {port}\n{extra}")
    sockets = tmp_path / "vsock"
    sockets.mkdir()
    return config, sockets


def test_a_peer_that_never_reads_is_cut_after_the_flush_bound(tmp_path: Path) -> None:
    from services import free_port

    port = free_port()
    config, sockets = _ingress_config(tmp_path, port)
    odyn = subprocess.Popen([sys.executable, "-m", "odyn", "--config-dir", str(config), "--transport",
                             f"unix:{sockets}", "--cid", str(ENCLAVE_CID), "--linger", "0", "--flush-timeout", "0.5",
                             "--", sys.executable, "-c", LEAVES_AT_ONCE, str(port), str(1 << 20)])

    async def main() -> bytes:
        logs_r, _logs_w = await _connect(sockets, LOGS_PORT)
        assert await asyncio.wait_for(logs_r.readline(), 20) == b"listening\n"
        _, writer = await _connect(sockets, port)
        writer.write(b"GET\n")  # and never read the answer (1 MiB: more than a Unix socket buffers)
        return await asyncio.wait_for(logs_r.read(), 30)

    logs = asyncio.run(main())
    assert b"odyn: flushed 0 open connection(s), cut 1 still open after 0.5s" in logs
    assert odyn.wait(30) == 0


SENDS_AND_LEAVES = r"""
import os, socket, sys
proxy = os.environ["HTTP_PROXY"].removeprefix("http://").rstrip("/").rsplit(":", 1)
s = socket.create_connection((proxy[0], int(proxy[1])))
s.sendall(f"CONNECT host:{sys.argv[1]} HTTP/1.1\r\n\r\n".encode())
assert s.recv(100).startswith(b"HTTP/1.1 200")
s.sendall(b"y" * (8 << 20))
os._exit(0)  # the upload is still in buffers
"""


def test_an_upload_in_flight_reaches_the_parent_before_the_exit_is_reported(tmp_path: Path) -> None:
    from enclaver_rules.policy import EgressPolicy
    from enclaver_rules.runtime.egress_host import HostEgress
    from services import free_port

    config, sockets = _ingress_config(tmp_path, free_port(), f"egress:\n  proxy_port: {free_port()}\n  allow: [host]\n")

    async def main() -> tuple[int, list[dict[str, object]]]:
        received = asyncio.get_running_loop().create_future()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            total = 0
            while chunk := await reader.read(1 << 20):
                total += len(chunk)
                await asyncio.sleep(0.005)  # a slow parent: the enclave side must wait for it
            received.set_result(total)
            writer.close()

        origin = await asyncio.start_server(sink, "127.0.0.1", 0)
        host_side = await HostEgress(EgressPolicy.from_lists(["host"]), UnixTransport(sockets, 2)).serve()
        odyn = subprocess.Popen([sys.executable, "-m", "odyn", "--config-dir", str(config), "--transport",
                                 f"unix:{sockets}", "--cid", str(ENCLAVE_CID), "--linger", "0", "--flush-timeout",
                                 "30", "--", sys.executable, "-c", SENDS_AND_LEAVES,
                                 str(origin.sockets[0].getsockname()[1])])
        status_r, _status_w = await _connect(sockets, STATUS_PORT)
        lines = [json.loads(x) for x in (await asyncio.wait_for(status_r.read(), 40)).splitlines()]
        code = await asyncio.get_running_loop().run_in_executor(None, odyn.wait, 30)
        assert code == 0
        # odyn is gone (as the enclave would be): the parent's side still passes on what it took
        total = await asyncio.wait_for(received, 30)
        host_side.close()
        origin.close()
        return total, lines

    total, lines = asyncio.run(main())
    assert total == 8 << 20 and lines[-1] == {"status": "exited", "code": 0}


def test_network_service_lines_reach_the_log_the_host_reads(tmp_path: Path) -> None:
    """The proxy's and ingress's own lines (a connection limit reached, a broken chunked body) went
    only to odyn's stderr, the enclave console nobody reads; now they are in the log ring."""
    from odyn import connections
    from odyn.supervisor import Supervisor
    from services import free_port

    config = tmp_path / "cfg"
    config.mkdir()
    (config / "enclaver.yaml").write_text(
        f"version: v1\nname: app\ntarget: t\nsources: {{app: a}}\negress:\n  proxy_port: {free_port()}\n"
        "  allow: [host]\n")

    async def main() -> bytes:
        supervisor = Supervisor(UnixTransport(tmp_path, ENCLAVE_CID))
        await supervisor.start_network(str(config / "enclaver.yaml"), {})
        try:
            connections.log("odyn: egress proxy: connection limit reached (256 open)")
            await asyncio.sleep(0.05)
            data, _, _ = supervisor._ring.read(0)
            return data
        finally:
            connections.set_log(None)
            for server in supervisor._network:
                server.close()

    assert b"odyn: egress proxy: connection limit reached (256 open)\n" in asyncio.run(main())
