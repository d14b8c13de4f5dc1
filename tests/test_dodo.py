"""dodo.py declares tasks only; doit runs them incrementally, in parallel, from a monorepo."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HEAD_VALID as HEAD
from conftest import REPO
from enclaver_rules.rules import DOIT_CONFIG, discover, tasks

DOIT = [sys.executable, "-m", "doit"]


@pytest.fixture
def monorepo(tmp_path: Path) -> Path:
    """A repository with dodo.py and three enclaves, one of them in a skipped directory."""
    shutil.copy(REPO / "dodo.py", tmp_path / "dodo.py")
    (tmp_path / "cache").mkdir()
    for rel, name in (("svc/a", "alpha"), ("svc/b", "beta"), ("node_modules/x", "ignored")):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "enclaver.yaml").write_text(HEAD.replace("name: app", f"name: {name}"))
    return tmp_path


def doit(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(DOIT + list(args), cwd=root, capture_output=True, text=True, timeout=120)


def test_doit_list_in_the_repository(tmp_path: Path) -> None:
    result = subprocess.run(DOIT + ["list", "--all", "--db-file", str(tmp_path / "db")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    for enclave in ("hello", "no-fly-list", "vault"):
        assert f"check:{enclave}" in names and f"explain:{enclave}" in names


def test_discovery_skips_build_dirs_and_names_tasks_by_manifest(monorepo: Path) -> None:
    assert [(e.name, e.path) for e in discover(str(monorepo))] == [
        ("alpha", "svc/a/enclaver.yaml"), ("beta", "svc/b/enclaver.yaml")]


def test_broken_manifest_still_lists_and_fails_its_check(monorepo: Path) -> None:
    (monorepo / "svc/b/enclaver.yaml").write_text("version: v1\nname: [\n")
    assert [e.name for e in discover(str(monorepo))] == ["alpha", "svc-b"]
    result = doit(monorepo, "check")
    assert result.returncode == 1
    assert "svc/b/enclaver.yaml:3:1: invalid YAML" in result.stdout + result.stderr


def test_incremental_and_parallel(monorepo: Path) -> None:
    first = doit(monorepo, "-n", "2", "check")
    assert first.returncode == 0, first.stderr
    assert {".  check:alpha", ".  check:beta"} <= set(first.stdout.splitlines())
    again = doit(monorepo, "check")
    assert {"-- check:alpha", "-- check:beta"} <= set(again.stdout.splitlines())
    manifest = monorepo / "svc/a/enclaver.yaml"
    manifest.write_text(manifest.read_text() + "# one more byte\n")
    third = doit(monorepo, "check")
    assert {".  check:alpha", "-- check:beta"} <= set(third.stdout.splitlines())
    assert (monorepo / DOIT_CONFIG["dep_file"]).exists()  # sqlite state under cache/


def test_default_tasks_explain_every_enclave(monorepo: Path) -> None:
    result = doit(monorepo)
    assert result.returncode == 0, result.stderr
    assert "alpha  (svc/a/enclaver.yaml)" in result.stdout and "beta  (svc/b/enclaver.yaml)" in result.stdout


def test_actions_are_picklable_for_parallel_runs() -> None:
    creators = tasks(str(REPO))
    for creator in creators.values():
        for task in creator():
            for action in task.get("actions", []):
                pickle.dumps(action)


def test_dodo_declares_only() -> None:
    """No task bodies, no actions in dodo.py: it wires task generators from the package (and, in this
    repository, from examples/images.py) into doit, nothing else."""
    source = (REPO / "dodo.py").read_text()
    assert not any(line.lstrip().startswith(("def ", "class ", "lambda")) for line in source.splitlines())
    assert '"actions"' not in source and "'actions'" not in source
    assert os.path.exists(REPO / "cache" / "README.md")
