"""`enclaver init`: a repository gets a dodo.py, a sample enclaver.yaml and .gitignore lines, and
doit lists the new enclave's tasks at once; nothing is ever overwritten without --force."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from enclaver_rules.cli import init as init_cmd
from enclaver_rules.cli.init_templates import DODO, GITIGNORE_COMMENT, manifest
from enclaver_rules.oci.reference import Reference


def doit_tasks(root: Path) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENC_")}
    result = subprocess.run([sys.executable, "-m", "doit", "list", "--all"], cwd=root, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path below `root` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def uncommented(text: str) -> str:
    """The sample with every example in it (the lines starting `#   `) taken in, replacing the empty
    ingress and egress they are examples of."""
    lines = []
    for line in text.splitlines():
        if line in ("ingress: []", "egress: {allow: []}"):
            continue
        lines.append(line[4:] if line.startswith("#   ") else line)
    return "\n".join(lines) + "\n"


def test_writes_the_three_files_and_doit_lists_the_enclave(in_tmp: Path, cli) -> None:
    result = cli("init", "payments")
    assert result.code == 0, result.stderr
    project = in_tmp / "payments"
    assert (project / "dodo.py").read_text() == DODO
    assert (project / "enclaver.yaml").read_text() == manifest("payments", "payments")
    assert (project / ".gitignore").read_text() == f"{GITIGNORE_COMMENT}\n/cache/\n.venv/\n"
    assert (project / "cache").is_dir()
    assert "wrote payments/enclaver.yaml" in result.stdout and "wrote payments/dodo.py" in result.stdout
    assert "doit build:payments" in result.stderr and "doit -n 4 build" in result.stderr  # next steps, for people
    assert {"check:payments", "explain:payments", "build:payments", "trust:payments", "push:payments",
            "verify:payments"} <= doit_tasks(project)


def test_dodo_py_only_imports_the_rule_set() -> None:
    code = [line for line in DODO.split('"""')[2].splitlines() if line.strip() and not line.startswith("#")]
    assert code == ["import os", "from enclaver_rules.rules import tasks",
                    "ROOT = os.path.dirname(os.path.abspath(__file__))", "globals().update(tasks(ROOT))"]


def test_the_sample_manifest_checks_clean_and_so_do_its_examples(in_tmp: Path, cli) -> None:
    assert cli("init").code == 0
    path = in_tmp / "enclaver.yaml"
    check = cli("manifest", "check", "--strict", str(path))
    assert check.code == 0, check.stdout + check.stderr
    doc = yaml.safe_load(path.read_text())
    assert doc["name"] == init_cmd.name_from(in_tmp.name)
    assert doc["ingress"] == [] and doc["egress"] == {"allow": []}  # nothing in, nothing out
    explain = cli("manifest", "explain", str(path))
    assert "nothing outside can connect" in explain.stdout and "no outbound network" in explain.stdout

    full = in_tmp / "full" / "enclaver.yaml"
    full.parent.mkdir()
    full.write_text(uncommented(path.read_text()))
    doc = yaml.safe_load(full.read_text())
    assert doc["ingress"] == [{"listen_port": 8080}] and "kms.*.amazonaws.com" in doc["egress"]["allow"]
    assert doc["kms_proxy"] == {"listen_port": 9999} and "blobs" in doc["build"]
    check = cli("manifest", "check", "--strict", str(full))
    assert check.code == 0, check.stdout + check.stderr


@pytest.mark.parametrize("existing", [["enclaver.yaml"], ["dodo.py"], ["enclaver.yaml", "dodo.py"]],
                         ids="+".join)
def test_refuses_to_overwrite_and_writes_nothing(in_tmp: Path, cli, existing: list[str]) -> None:
    for name in existing:
        (in_tmp / name).write_text(f"# the user's own {name}\n")
    (in_tmp / ".gitignore").write_text("node_modules/\n")
    before = snapshot(in_tmp)
    result = cli("init")
    assert result.code == 2
    for name in existing:
        assert f"{name}: exists" in result.stderr
    assert "--force" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(in_tmp) == before  # byte for byte, no cache/, no .gitignore lines, no temp files


def test_force_replaces_the_files_in_the_way(in_tmp: Path, cli) -> None:
    (in_tmp / "enclaver.yaml").write_text("old\n")
    (in_tmp / "dodo.py").write_text("old\n")
    assert cli("init", "--force", "--name", "svc").code == 0
    assert (in_tmp / "enclaver.yaml").read_text() == manifest("svc", "svc")
    assert (in_tmp / "dodo.py").read_text() == DODO
    assert sorted(p.name for p in in_tmp.iterdir()) == [".gitignore", "cache", "dodo.py", "enclaver.yaml"]


def test_gitignore_gets_only_missing_lines_once(in_tmp: Path, cli) -> None:
    gitignore = in_tmp / ".gitignore"
    gitignore.write_text("node_modules/\n/cache/*")  # cache ignored already; no final newline
    assert cli("init").code == 0
    assert gitignore.read_text() == f"node_modules/\n/cache/*\n{GITIGNORE_COMMENT}\n.venv/\n"
    # again, with the manifest gone: the dodo.py is kept (it loads enclaver's rules), .gitignore untouched
    (in_tmp / "enclaver.yaml").unlink()
    again = cli("init", "--json")
    assert again.code == 0, again.stderr
    assert again.json()["written"] == ["enclaver.yaml"] and again.json()["kept"] == ["dodo.py"]
    assert again.json()["gitignore"] == {"path": ".gitignore", "added": []}
    assert gitignore.read_text() == f"node_modules/\n/cache/*\n{GITIGNORE_COMMENT}\n.venv/\n"


@pytest.mark.parametrize("directory, name, repository", [
    ("payments", "payments", "payments"),
    ("My Service!", "my-service", "my-service"),
    ("..hidden__", "hidden", "hidden"),
    ("Foo..Bar_baz", "foo..bar_baz", "foo-bar-baz"),
    ("ünïcode", "n-code", "n-code"),
    ("2024", "2024", "2024"),
    ("___", "enclave", "enclave"),
    ("x" * 200, "x" * 128, "x" * 128),
])
def test_name_from_the_directory(directory: str, name: str, repository: str) -> None:
    assert init_cmd.name_from(directory) == name
    assert init_cmd.repository_from(name) == repository
    Reference.parse(f"registry.example.com/{repository}:enclave")  # the target is a valid reference


@pytest.mark.parametrize("directory", ["My Service!", "2024", "Foo..Bar_baz"])
def test_a_sanitised_name_makes_a_valid_manifest(in_tmp: Path, cli, directory: str) -> None:
    assert cli("init", directory).code == 0
    check = cli("manifest", "check", "--strict", str(in_tmp / directory / "enclaver.yaml"))
    assert check.code == 0, check.stdout + check.stderr
    assert yaml.safe_load((in_tmp / directory / "enclaver.yaml").read_text())["name"] == init_cmd.name_from(directory)


def test_invalid_name_or_dir_writes_nothing(in_tmp: Path, cli) -> None:
    result = cli("init", "new", "--name", "-bad name")
    assert result.code == 2 and "--name" in result.stderr
    assert not (in_tmp / "new").exists()
    (in_tmp / "file").write_text("x")
    assert cli("init", "file").code == 2


def test_monorepo_second_enclave_gets_only_a_manifest(in_tmp: Path, cli) -> None:
    repo = in_tmp / "repo"
    (repo / ".git").mkdir(parents=True)
    assert cli("init", "repo", "--name", "web").code == 0
    result = cli("init", "repo/services/api", "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["written"] == ["repo/services/api/enclaver.yaml"] and doc["project"] == "repo"
    assert doc["gitignore"] is None and doc["created"] == []
    assert sorted(p.name for p in (repo / "services/api").iterdir()) == ["enclaver.yaml"]
    assert any(step.startswith("cd repo && doit build:api") for step in doc["next"])
    assert {"build:web", "build:api", "check:api"} <= doit_tasks(repo)
    # a name the project has already is refused: task names must be unique
    clash = cli("init", "repo/other/api")
    assert clash.code == 2 and "already names an enclave 'api'" in clash.stderr and "--name" in clash.stderr
    assert not (repo / "other").exists()
    assert cli("init", "repo/other/api", "--name", "other-api").code == 0


def test_monorepo_directory_that_discovery_skips_is_warned_about(in_tmp: Path, cli) -> None:
    (in_tmp / ".git").mkdir()
    assert cli("init").code == 0
    result = cli("init", "build/x")
    assert result.code == 0 and "doit will not find build/x/enclaver.yaml" in result.stderr


def test_a_failed_write_leaves_nothing_behind(in_tmp: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from enclaver_rules.oci import store

    real = store.atomic_write

    def failing(path: Path, data: bytes) -> None:
        if path.name == "dodo.py":
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(store, "atomic_write", failing)
    result = cli("init", "a/b")
    assert result.code == 1 and "No space left on device" in result.stderr
    assert not (in_tmp / "a").exists()


def test_next_steps_say_where_doit_is_when_it_is_not_on_path(in_tmp: Path, cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    doit = Path(sys.executable).parent / "doit"
    monkeypatch.setenv("PATH", str(in_tmp / "nothing"))  # not even a system-wide doit
    result = cli("init", "a")
    assert result.code == 0 and f"doit is not on PATH: run {doit}" in result.stderr
    monkeypatch.setenv("PATH", str(doit.parent))
    result = cli("init", "b")
    assert result.code == 0 and "not on PATH" not in result.stderr
