"""Task `run_enclave:<name>` (doit reserves `run`): `enclaver run` of the enclave's latest build, the doit twin of the command.

Never a default task and never up to date (a run is not an output). It depends on `build:<name>`, so
`doit run_enclave:hello` builds what changed first. Everything after the task name goes to `enclaver run`
(doit's `pos_arg`), behind `--` so doit does not read the flags as its own: `doit run_enclave:hello --
-p 8080:8080`; a value holding `=` is written `--sim-host=NAME=IP:PORT` (doit takes a bare
`NAME=VALUE` argument as its own variable); `--simulate` is added by itself
when this machine has no /dev/nitro_enclaves. The run is a child process with the same cache, so
Ctrl-C reaches it and it drains as `enclaver run` does; a non-zero exit code fails the task and is
printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from enclaver_rules.rules.common import out_dir, reported

NITRO_DEVICE = "/dev/nitro_enclaves"


def run_command(cache_dir: str, name: str, args: list[str], nitro: bool) -> list[str]:
    """The `enclaver run` command line for the latest build of `name`."""
    build = str(out_dir(cache_dir, name) / "latest")
    simulate = [] if nitro or "--simulate" in args else ["--simulate"]
    return [sys.executable, "-m", "enclaver_rules.cli", "run", build, *simulate, *args]


@reported
def run_enclave(cache_dir: str, name: str, args: list[str]) -> bool:
    argv = run_command(cache_dir, name, list(args or []), os.path.exists(NITRO_DEVICE))
    code = subprocess.run(argv, env={**os.environ, "ENC_CACHE_DIR": cache_dir}, check=False).returncode
    if code != 0:
        print(f"run_enclave:{name}: enclaver run exited {code}", file=sys.stderr)
    return code == 0


def run_tasks(enclaves: list[Any], cache_dir: str) -> Iterator[dict[str, Any]]:
    for e in enclaves:
        yield {
            "basename": "run_enclave", "name": e.name,
            "doc": f"enclaver run of {e.path}'s latest build (--simulate off a Nitro host); arguments after it go "
                   "to enclaver run",
            "actions": [(run_enclave, [cache_dir, e.name])],
            "task_dep": [f"build:{e.name}"],
            "pos_arg": "args",
            "uptodate": [False],
            "verbosity": 2,
        }
