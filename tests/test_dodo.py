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
from enclaver_rules.rules import discover, tasks

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
    assert (monorepo / "cache" / "doit.sqlite3").exists()  # sqlite state under cache/


def test_default_tasks_explain_every_enclave(monorepo: Path) -> None:
    result = doit(monorepo)
    assert result.returncode == 0, result.stderr
    assert "alpha  (svc/a/enclaver.yaml)" in result.stdout and "beta  (svc/b/enclaver.yaml)" in result.stdout


def test_actions_are_picklable_for_parallel_runs() -> None:
    creators = tasks(str(REPO))
    for key, creator in creators.items():
        if key.startswith("task_"):
            for task in creator():
                for action in task.get("actions", []) + task.get("clean", []):
                    pickle.dumps(action)


def test_every_task_reports_errors_like_the_cli() -> None:
    """Every Python action goes through `reported`: a user error fails the task with its message and
    fix, never a traceback (the odyn build once lacked it and showed one for a missing objdump)."""
    for key, creator in tasks(str(REPO)).items():
        if not key.startswith("task_"):
            continue
        for task in creator():
            for action in task.get("actions", []) + task.get("clean", []):
                if isinstance(action, tuple) and callable(action[0]) and action[0].__module__ != "enclaver_rules.rules.clean":
                    assert hasattr(action[0], "__wrapped__"), f"{task['basename']}:{task.get('name')}: {action[0]}"


def copy_dodo(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    (root / "svc/a").mkdir(parents=True)
    (root / "svc/a/enclaver.yaml").write_text(HEAD.replace("name: app", "name: alpha"))


def test_a_repository_without_a_cache_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """doit opened cache/doit.sqlite3 before any task and crashed with sqlite3.OperationalError."""
    monkeypatch.delenv("ENC_CACHE_DIR", raising=False)
    copy_dodo(tmp_path / "repo")
    result = doit(tmp_path / "repo", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "repo" / "cache" / "doit.sqlite3").is_file()


def test_enc_cache_dir_moves_every_piece_of_state(tmp_path: Path) -> None:
    copy_dodo(tmp_path / "repo")
    elsewhere = tmp_path / "ci-volume" / "enclaver"
    env = {**os.environ, "ENC_CACHE_DIR": str(elsewhere)}
    result = subprocess.run(DOIT + ["check"], cwd=tmp_path / "repo", capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (elsewhere / "doit.sqlite3").is_file()
    assert not (tmp_path / "repo" / "cache").exists()


def test_doit_from_a_subfolder_with_seek_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`doit -k` (or DOIT_SEEK_FILE=1) finds dodo.py above the current directory; the state and the
    task paths are the repository's, so a run from the root afterwards is up to date."""
    monkeypatch.delenv("ENC_CACHE_DIR", raising=False)
    root = tmp_path / "repo"
    copy_dodo(root)
    first = doit(root / "svc" / "a", "-k", "check:alpha")
    assert first.returncode == 0, first.stdout + first.stderr
    assert ".  check:alpha" in first.stdout.splitlines()
    env = {**os.environ, "DOIT_SEEK_FILE": "1"}
    again = subprocess.run(DOIT + ["check:alpha"], cwd=root / "svc", capture_output=True, text=True, timeout=120,
                           env=env)
    assert again.returncode == 0 and "-- check:alpha" in again.stdout.splitlines(), again.stdout + again.stderr
    assert "-- check:alpha" in doit(root, "check:alpha").stdout.splitlines()


def test_task_paths_are_the_same_however_the_repository_is_named(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """doit keys its state by file_dep paths: a relative, unnormalised or symlinked path to the same
    manifest must give the same task, or `doit` and `enclaver build -f` rebuild each other's work."""
    from enclaver_rules.rules.discover import Enclave

    monkeypatch.delenv("ENC_CACHE_DIR", raising=False)
    root = tmp_path / "repo"
    copy_dodo(root)
    (tmp_path / "link").symlink_to(root)
    monkeypatch.chdir(tmp_path)

    def deps(**kwargs: object) -> tuple[object, ...]:
        task = next(t for t in tasks(**kwargs)["task_layer"]() if t.get("name") == "alpha")  # type: ignore[arg-type]
        return tuple(task["file_dep"]) + tuple(task["targets"])

    expected = deps(root=str(root))
    assert deps(root="repo") == expected
    assert deps(root=str(tmp_path / "link")) == expected
    assert deps(root="link/svc/..", enclaves=[Enclave("alpha", "./svc/a/../a/enclaver.yaml")]) == expected


def test_dodo_declares_only() -> None:
    """No task bodies, no actions in dodo.py: it wires task generators from the package (and, in this
    repository, from examples/images.py) into doit, nothing else."""
    source = (REPO / "dodo.py").read_text()
    assert not any(line.lstrip().startswith(("def ", "class ", "lambda")) for line in source.splitlines())
    assert '"actions"' not in source and "'actions'" not in source
    assert os.path.exists(REPO / "cache" / "README.md")


def test_a_typo_in_sources_app_names_the_manifest_field_and_says_no_such_file(tmp_path: Path) -> None:
    """A missing file used to surface as a registry (DNS) error; now: the manifest, the field, the path."""
    from doit.exceptions import TaskFailed

    from enclaver_rules.rules.resolve import resolve_enclave

    manifest = tmp_path / "svc" / "enclaver.yaml"
    manifest.parent.mkdir()
    manifest.write_text(HEAD.replace('app: "registry.example.com/app:1.0"', "app: ./app-typo.tar"))
    result = resolve_enclave(str(manifest), "app", str(tmp_path / "cache"))
    assert isinstance(result, TaskFailed)
    text = str(result)
    assert f"{manifest}" in text and "sources.app" in text and "no such file" in text, text
    assert "registry-1.docker.io" not in text and "cannot be reached" not in text


def test_every_test_that_reaches_a_service_is_marked(tmp_path: Path) -> None:
    """`-m "not services"` must leave out exactly the tests needing dockerd or the registry; four
    were unmarked (conftest now marks whatever reaches those fixtures). The whole suite is collected
    in a subprocess with a probe plugin that lists tests using a service fixture without the mark."""
    (tmp_path / "marker_probe.py").write_text(
        "def pytest_collection_finish(session):\n"
        "    for item in session.items:\n"
        "        if {'dockerd', 'registry'} & set(getattr(item, 'fixturenames', ()))"
        " and item.get_closest_marker('services') is None:\n"
        "            print('UNMARKED', item.nodeid)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "marker_probe",
                             "-p", "no:cacheprovider", str(REPO / "tests")], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "UNMARKED" not in result.stdout, [line for line in result.stdout.splitlines() if "UNMARKED" in line]
