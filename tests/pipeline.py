"""Helpers for the rule-set tests: a monorepo's app images, doit in a subprocess, its records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from enclaver_rules.oci.layer import Entry
from oci_helpers import make_layout

DOIT = [sys.executable, "-m", "doit"]
NAMES = ("alpha", "beta", "gamma")


def make_app(directory: Path, payload: str) -> None:
    shutil.rmtree(directory / "app", ignore_errors=True)
    make_layout(str(directory / "app"), "latest", [[Entry.file("bin/app", payload.encode(), 0o755),
                                                    Entry.file("etc/motd", b"hello\n")]], cmd=("/bin/app", "--serve"))


def doit(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`doit ARGS` in `root`, at a fixed SOURCE_DATE_EPOCH, with `env` added."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", **(env or {})}
    return subprocess.run(DOIT + list(args), cwd=root, capture_output=True, text=True, timeout=600, env=env)


def summary(root: Path, name: str) -> dict[str, object]:
    return json.loads((root / "cache" / "out" / name / "latest" / "build.json").read_text())  # type: ignore[no-any-return]


def ran(output: str, task: str) -> bool:
    return any(line == f".  {task}" for line in output.splitlines())
