"""What every benchmark here needs: run a child process (wall time and peak RSS), wait for one and
take its CPU and peak RSS (wait4), a peak RSS from /proc, percentiles, a byte stream that is checked
as fast as it is read, and SIGTERM/SIGHUP unwinding like Ctrl-C so every benchmark's clean-up runs."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import overload


@dataclass
class Usage:
    """What wait4 says a child used (its reaped descendants included)."""

    cpu: float = 0.0  # seconds, user + system (rusage: microseconds)
    peak_rss_kib: int = 0


@overload
def wait_usage(proc: subprocess.Popen[bytes]) -> Usage: ...
@overload
def wait_usage(proc: subprocess.Popen[bytes], deadline: float, interval: float = ...) -> Usage | None: ...
def wait_usage(proc: subprocess.Popen[bytes], deadline: float | None = None, interval: float = 0.001) -> Usage | None:
    """Reap `proc` with wait4, set its returncode and return its CPU and peak RSS: the one place that
    reads a child's rusage, which Popen.wait throws away. With a `deadline` (time.monotonic()), poll
    every `interval` seconds and return None if it passes first (the child is left running: the caller
    kills it or gives up); without one, block."""
    while True:
        pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Usage(usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(interval)


def status_kib(pid: int, what: str = "VmHWM") -> int:
    """A KiB field of /proc/PID/status (VmHWM: peak RSS so far; VmRSS: RSS now); 0 if the process has
    none (a zombie). OSError if the process is gone."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{what}:"):
                return int(line.split()[1])
    return 0


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, from wait4) of one command; exits loudly if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    usage = wait_usage(proc)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr.read().decode() if proc.stderr else ''}")
    return elapsed, usage.peak_rss_kib


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


PATTERN_LEN = (1 << 20) + 13  # odd, so no chunk or read size lines up with it
CHUNK = 1 << 20  # < PATTERN_LEN: any chunk is one slice of pattern()


def pattern() -> bytes:
    """A stream's content, twice over: any window of up to PATTERN_LEN bytes is one slice of it."""
    block = random.Random(0x656E636C).randbytes(PATTERN_LEN)
    return block + block


def receive_checked(sock: socket.socket, data: bytes, buf: bytearray, offset: int = 0) -> tuple[int, bool]:
    """Read `sock` to EOF into `buf` (CHUNK bytes, the caller's: not allocated while timed), comparing every
    byte with `data` (pattern(), from `offset`) at memcmp speed: (bytes read, all equal). So a relay that
    drops, duplicates or reorders bytes fails the run instead of looking fast."""
    view = memoryview(buf)
    count = 0
    ok = True
    while n := sock.recv_into(buf):
        ok = ok and data.startswith(view[:n], offset)
        count += n
        offset = (offset + n) % PATTERN_LEN
    return count, ok


class Terminated(SystemExit):
    pass


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C does, so every `finally` runs."""
    def raise_exit(signum: int, frame: FrameType | None) -> None:
        raise Terminated(128 + signum)

    old = {s: signal.signal(s, raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# -- reaching the peers a benchmark starts ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def wait_ready(check: Callable[[], None], what: str, connect: Callable[[], socket.socket], timeout: float) -> None:
    """Until `connect` succeeds: a peer that is up. `check` raises when a child died meanwhile, so a
    broken start fails at once instead of at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        check()
        try:
            connect().close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not come up in {timeout:.0f} s") from None
            time.sleep(0.02)
