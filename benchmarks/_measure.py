"""What every benchmark here needs: run a child process (wall time and peak RSS), percentiles, and
SIGTERM/SIGHUP unwinding like Ctrl-C so every benchmark's clean-up runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from types import FrameType


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, from wait4) of one command; exits loudly if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr.read().decode() if proc.stderr else ''}")
    return elapsed, usage.ru_maxrss


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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
