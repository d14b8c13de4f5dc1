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
