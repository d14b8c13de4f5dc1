"""The console copy (issue 18 item 4): odyn also writes the log to its own stdout, unless `--no-console`,
so the app's output shows under plain `docker run` and on `nitro-cli console`; a stuck stdout never
blocks anything, and the log ring is unchanged either way."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from odyn.console import Console
from tests.test_odyn_supervisor import ENCLAVE_CID, collect

APP = "import sys; print('to stdout', flush=True); print('to stderr', file=sys.stderr, flush=True); sys.exit(4)"


def run_odyn(directory: Path, *flags: str) -> tuple[int, bytes, bytes, list[dict[str, object]]]:
    odyn = subprocess.Popen([sys.executable, "-m", "odyn", "--transport", f"unix:{directory}", "--cid", str(ENCLAVE_CID),
                             "--no-bootstrap", "--linger", "1.5", *flags, "--", sys.executable, "-c", APP],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines, logs = asyncio.run(collect(directory))
    out, _ = odyn.communicate(timeout=30)
    return odyn.returncode, out, logs, lines


def test_the_apps_output_appears_on_odyns_stdout_and_in_the_ring(tmp_path: Path) -> None:
    code, out, logs, lines = run_odyn(tmp_path)
    assert code == 4 and lines[-1] == {"status": "exited", "code": 4}
    assert b"to stdout\n" in out and b"to stderr\n" in out
    assert b"to stdout\n" in logs and b"to stderr\n" in logs


def test_no_console_keeps_stdout_silent_and_the_ring_full(tmp_path: Path) -> None:
    code, out, logs, _ = run_odyn(tmp_path, "--no-console")
    assert code == 4
    assert out == b""
    assert b"to stdout\n" in logs and b"to stderr\n" in logs


def test_a_stuck_stdout_drops_with_a_marker_and_never_blocks() -> None:
    read_end, write_end = os.pipe()
    try:
        console = Console(write_end, bound=1000)
        pipe_size = 1 << 20  # more than any pipe buffer: the drain thread is stuck in write()
        for _ in range(pipe_size // 500 + 10):
            console.write(b"x" * 499 + b"\n")  # returns at once even though nobody reads the pipe
        assert console.dropped > 0
        console.write(b"LAST\n")  # still dropped: nothing was read yet
        got = bytearray()

        def read_all() -> None:
            while chunk := os.read(read_end, 1 << 16):
                got.extend(chunk)

        reader = threading.Thread(target=read_all)
        reader.start()
        assert console.close(30)  # drains once the pipe is read
        console.write(b"after close\n")
        os.close(write_end)
        write_end = -1
        reader.join(30)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert b"LAST" not in got and b"after close" not in got
    assert len(got) <= pipe_size + 2000


def test_the_marker_says_how_much_was_lost() -> None:
    read_end, write_end = os.pipe()
    console = Console(write_end, bound=10)
    console._queued = 10  # as if 10 bytes were stuck in a write to stdout (the drain thread is idle)
    console.write(b"12345")
    assert console.dropped == 5
    console._queued = 0
    console.write(b"ok\n")
    assert console.close(10)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 1 << 16):
        data += chunk
    os.close(read_end)
    assert data.endswith(b"[odyn: 5 bytes of console output dropped: stdout is not keeping up]\nok\n")


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Console(1, bound=0)
