"""What every benchmark here needs: run a child process, return its wall time and peak RSS."""

from __future__ import annotations

import os
import subprocess
import time


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, from wait4) of one command; exits loudly if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr.read().decode() if proc.stderr else ''}")
    return elapsed, usage.ru_maxrss
