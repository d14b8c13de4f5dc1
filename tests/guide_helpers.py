"""The guides' scripts for the tests that run them: the no-fly-list guide's module
(examples/no-fly-list/run.py), loaded once, `load` for another guide's (tests/test_guide_vault.py's),
and a checkout in which a guide's build step ran (its app image, the enclave), for a module-scoped
fixture. tests/test_guide_no_fly_list.py (the guide working), tests/test_guide_failures.py (the guide
failing on purpose) and tests/test_guide_vault.py share them."""

from __future__ import annotations

import importlib.util
import json
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


def load(name: str, path: Path) -> ModuleType:
    """A guide's run.py as the module `name` (its directory is no package, so it is loaded by path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


guide = load("no_fly_list_guide", REPO / "examples" / "no-fly-list" / "run.py")


def checkout(template: Path, dockerd: Dockerd, root: Path, module: ModuleType = guide,
             work: str = "no-fly-list-guide") -> tuple[Any, Path]:
    """A checkout at `root` (dodo.py, examples/, the session's cache with odyn built) in which the first
    step of the guide `module` (default the no-fly-list guide's) ran, its state under cache/`work`: the
    Guide and the build directory."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copytree(REPO / "examples", root / "examples",
                    ignore=shutil.ignore_patterns("image", "blobs-dev", "__pycache__"))
    shutil.copytree(template / "cache", root / "cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENC_")}
    env.update(DOCKER_HOST=dockerd.host, SOURCE_DATE_EPOCH="1700000000")  # the template's odyn: not rebuilt
    started = time.monotonic()
    the_guide = module.Guide(repo=root, work=root / "cache" / work, env=env)
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


def trusted_policy(the_guide: Any, build_dir: Path) -> dict[str, Any]:
    """The guide's step 2 for `build_dir`: its key policy, checked to let only this build's PCR0 decrypt."""
    policy: dict[str, Any] = the_guide.key_policy(build_dir)
    pcr0 = json.loads((build_dir / "measurements.json").read_text())["Measurements"]["PCR0"]
    allow = next(s for s in policy["Statement"] if s["Sid"].startswith("EnclaveMayDecrypt"))
    assert allow["Condition"]["StringEqualsIgnoreCase"]["kms:RecipientAttestation:ImageSha384"] == pcr0
    return policy


def refused_policy(the_guide: Any, module: ModuleType, build_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """A key policy for another build's PCR0 (`module`'s other_measurements), checked not to name this one's."""
    other = module.other_measurements(build_dir, tmp_path / "other-measurements.json")
    policy: dict[str, Any] = the_guide.key_policy(other)
    pcr0 = json.loads((build_dir / "measurements.json").read_text())["Measurements"]["PCR0"]
    assert pcr0 not in json.dumps(policy)
    return policy
