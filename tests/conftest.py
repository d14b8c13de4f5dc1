"""Shared fixtures: the CLI run in-process, manifests in temp dirs, real services, hypothesis profiles."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from enclaver_rules.cli.main import main
from enclaver_rules.eif.blobs import write_dev_blobs
from pipeline import NAMES, doit, make_app
from services import Dockerd, Registry, start_dockerd, start_registry

settings.register_profile("fast", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*/enclaver.yaml"))


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """Run `enclaver ARGS` in-process; ENC_* variables of the outer environment are removed."""
    for name in list(os.environ):
        if name.startswith("ENC_"):
            monkeypatch.delenv(name)

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        out, err = io.StringIO(), io.StringIO()
        code = main(list(args), stdout=out, stderr=err)
        for k in env or {}:
            monkeypatch.delenv(k)
        return Result(code, out.getvalue(), err.getvalue())

    return run


@pytest.fixture(autouse=True)
def _restore_enclaver_logger() -> Iterator[None]:
    """The CLI, run in-process, configures the `enclaver` logger (its own handler, no propagation);
    without this a later test's caplog would see nothing from enclaver's modules."""
    logger = logging.getLogger("enclaver")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


#: Fixtures that start a real service; a test reaching one (directly or through another fixture)
#: is marked `services`, so `-m "not services"` leaves out exactly the tests that need dockerd or
#: the registry, whoever forgets the marker.
SERVICE_FIXTURES = frozenset({"dockerd", "registry"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("services"):
            item.add_marker(pytest.mark.services)


HEAD_VALID = """\
version: v1
name: app
target: "registry.example.com/app:enclave"
sources:
  app: "registry.example.com/app:1.0"
"""


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in an empty directory, so diagnostics name `enclaver.yaml` relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    yield from start_dockerd(tmp_path_factory.mktemp("dockerd"))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from start_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def odyn_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache holding the default odyn image, built once per session (~15 s)."""
    from enclaver_rules.rules.odyn import build_odyn_image

    cache = tmp_path_factory.mktemp("odyn-cache")
    result = build_odyn_image(str(cache))  # a task action: failures come back as TaskFailed, not raised
    assert isinstance(result, dict), result
    yield cache


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory, odyn_cache: Path) -> Path:
    """A monorepo whose doit state already knows the default odyn image (built once per session)."""
    root = tmp_path_factory.mktemp("template") / "repo"
    root.mkdir()
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copytree(odyn_cache, root / "cache")
    write_dev_blobs(root / "blobs", "x86_64")
    for name in NAMES:
        directory = root / "services" / name
        directory.mkdir(parents=True)
        make_app(directory, f"#!/bin/sh\necho {name}\n")
        (directory / "enclaver.yaml").write_text(
            f"version: v1\nname: {name}\ntarget: example.test/{name}:release\nsources:\n  app: oci:app:latest\n"
            f"ingress:\n  - listen_port: 8080\nbuild:\n  blobs: ../../blobs\n")
    result = doit(root, "odyn_image")  # reproducible: rebuilds the same bytes, and doit records it
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def monorepo(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("ENC_CACHE_DIR", raising=False)
    root = tmp_path / "repo"
    shutil.copytree(template, root, symlinks=True)
    return root
