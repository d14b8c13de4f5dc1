"""odyn's supervisor as a real process over the Unix transport, with the test as the host side."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from enclaver_rules.ports import LOGS_PORT, STATUS_PORT
from odyn.transport import UnixTransport

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
    """Every status line until the final one, and the whole log until end-of-stream."""
    (status_r, _), (logs_r, _) = await asyncio.gather(_connect(directory, STATUS_PORT), _connect(directory, LOGS_PORT))
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
        reader, _ = await _connect(tmp_path, LOGS_PORT)
        return await asyncio.wait_for(reader.read(), 20)

    assert asyncio.run(late()) == b"early bird\n"
    assert odyn.wait(30) == 0


def test_sigterm_is_forwarded_for_a_graceful_stop(tmp_path: Path) -> None:
    app = ("import signal, sys, time\n"
           "def stop(*_):\n print('graceful', flush=True); sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    odyn = start_odyn(tmp_path, sys.executable, "-c", app)

    async def scenario() -> tuple[list[dict[str, object]], bytes]:
        reader, _ = await _connect(tmp_path, LOGS_PORT)
        assert await asyncio.wait_for(reader.readline(), 20) == b"ready\n"
        odyn.send_signal(signal.SIGTERM)
        status_r, _ = await _connect(tmp_path, STATUS_PORT)
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
        logs_reader, _ = await _connect(sockets, LOGS_PORT)
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
