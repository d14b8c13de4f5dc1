"""The no-fly-list guide (examples/no-fly-list/run.py) for the tests that run it: its module, loaded
once, and a checkout in which its build step ran (the app image from Debian's packages, the enclave),
for a module-scoped fixture. tests/test_guide_no_fly_list.py (the guide working) and
tests/test_guide_failures.py (the guide failing on purpose) share them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import docker

from conftest import REPO
from services import Dockerd


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


guide = _load("no_fly_list_guide", REPO / "examples" / "no-fly-list" / "run.py")


def checkout(template: Path, dockerd: Dockerd, root: Path) -> tuple[Any, Path]:
    """A checkout at `root` (dodo.py, examples/, the session's cache with odyn built) in which the
    guide's first step ran: the Guide and the build directory."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copytree(REPO / "examples", root / "examples",
                    ignore=shutil.ignore_patterns("image", "blobs-dev", "__pycache__"))
    shutil.copytree(template / "cache", root / "cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENC_")}
    env.update(DOCKER_HOST=dockerd.host, SOURCE_DATE_EPOCH="1700000000")  # the template's odyn: not rebuilt
    started = time.monotonic()
    the_guide = guide.Guide(repo=root, work=root / "cache" / "no-fly-list-guide", env=env)
    build_dir = the_guide.build()
    print(f"the guide's build step took {time.monotonic() - started:.0f} s")
    return the_guide, build_dir


def simulator_containers(dockerd: Dockerd) -> list[object]:
    """The simulator's containers left in the engine (there should be none once a run ended)."""
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        return list(client.containers.list(all=True, filters={"label": "dev.enclaver.simulator"}))
    finally:
        client.close()
