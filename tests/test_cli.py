"""CLI habits: help and exit codes, JSON on every inspecting command, colour rules, no tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO
from enclaver_rules import __version__
from enclaver_rules.cli import main as main_module
from enclaver_rules.cli.exit_codes import ExitCode, code_for
from enclaver_rules.errors import EnclaverError, InvalidInput, OperationFailed

ENCLAVER = shutil.which("enclaver", path=os.path.dirname(sys.executable))
COMMANDS = [["manifest", "check"], ["manifest", "explain"], ["config", "show"], ["egress", "test"]]
HELLO = str(REPO / "examples/hello/enclaver.yaml")


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert ENCLAVER, "the enclaver console script is not installed next to this Python"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ENC_") and k not in ("NO_COLOR", "FORCE_COLOR")}
    full_env.update(env or {})
    return subprocess.run([ENCLAVER, *args], capture_output=True, text=True, env=full_env, input=stdin, timeout=60)


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"enclaver {__version__}"


def test_help_lists_commands_and_exit_codes() -> None:
    result = run("--help")
    assert result.returncode == 0
    for word in ("manifest", "config", "egress", "exit codes:", "130"):
        assert word in result.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_documents_its_exit_codes(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "exit codes:" in result.stdout and "  0 " in result.stdout and "  2 " in result.stdout
    assert "--json" in result.stdout


@pytest.mark.parametrize("command, extra", [
    (["manifest", "check"], [HELLO]),
    (["manifest", "explain"], [HELLO]),
    (["config", "show"], ["-f", HELLO]),
    (["egress", "test"], ["-f", HELLO, "example.com"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and not v[0].startswith("/") else "")
def test_every_inspecting_command_has_json(command: list[str], extra: list[str], cli) -> None:
    result = cli(*command, *extra, "--json")
    doc = json.loads(result.stdout)
    assert doc["version"] == 1


def test_main_job_commands_on_the_examples() -> None:
    check = run("manifest", "check", *map(str, EXAMPLES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(check.stdout.splitlines()) == len(EXAMPLES)
    show = run("config", "show", "-f", HELLO, "--json")
    assert show.returncode == 0 and json.loads(show.stdout)["settings"]["name"]["value"] == "hello"


def test_exit_code_for_denied_and_bad_input() -> None:
    assert run("egress", "test", "--allow", "a.com", "a.com").returncode == 0
    assert run("egress", "test", "--allow", "a.com", "b.com").returncode == 1
    assert run("egress", "test", "--allow", "a.com", "b.com:0").returncode == 2
    assert run("manifest", "frobnicate").returncode == 2  # argparse usage error


def test_no_colour_when_piped_or_no_color(tmp_path: Path) -> None:
    bad = tmp_path / "enclaver.yaml"
    bad.write_text("version: v9\n")
    for env in ({}, {"NO_COLOR": "1", "FORCE_COLOR": "1"}):
        result = run("manifest", "check", str(bad), env=env)
        assert "\x1b[" not in result.stdout + result.stderr
    forced = run("manifest", "check", str(bad), env={"FORCE_COLOR": "1"})
    assert "\x1b[" in forced.stdout  # the same output on a terminal is coloured


def test_user_error_has_no_traceback_unless_debug() -> None:
    plain = run("egress", "test", "-f", "/nonexistent/enclaver.yaml", "a.com")
    assert plain.returncode == 2
    assert plain.stderr.strip() == ("/nonexistent/enclaver.yaml: cannot read the manifest: no such file — give the "
                                    "manifest's path with -f, or run where enclaver.yaml is")
    debug = run("--debug", "egress", "test", "-f", "/nonexistent/enclaver.yaml", "a.com")
    assert "Traceback" in debug.stderr and debug.returncode == 2


def test_internal_error_is_exit_3_with_a_hint(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(args, out):  # type: ignore[no-untyped-def]
        raise KeyError("unexpected")

    monkeypatch.setattr(main_module.manifest_cmd, "run_check", boom)
    result = cli("manifest", "check", HELLO)
    assert result.code == 3
    assert "internal error: KeyError" in result.stderr and "Traceback" not in result.stderr
    assert "--debug" in result.stderr
    debug = cli("manifest", "check", "--debug", HELLO)
    assert "Traceback" in debug.stderr


def test_common_flags_work_after_the_command(tmp_path: Path) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text(Path(HELLO).read_text().replace("cpu_count: 2", "cpu_count: 3"))
    loud = run("manifest", "check", str(path))
    quiet = run("manifest", "check", "-q", str(path))
    assert "warning" in loud.stdout and loud.returncode == 0
    assert quiet.stdout == "" and quiet.returncode == 0
    assert run("manifest", "check", "--strict", str(path)).returncode == 2


def test_manifest_from_stdin() -> None:
    result = run("manifest", "check", "-", stdin=Path(HELLO).read_text())
    assert result.returncode == 0 and result.stdout.strip() == "-: valid — hello"


def test_exit_code_mapping() -> None:
    assert code_for(InvalidInput("x")) is ExitCode.INVALID_INPUT
    assert code_for(OperationFailed("x")) is ExitCode.FAILURE
    assert code_for(EnclaverError("x")) is ExitCode.FAILURE
    assert code_for(KeyboardInterrupt()) is ExitCode.INTERRUPTED
    assert code_for(ValueError()) is ExitCode.INTERNAL_ERROR
    assert all(code.doc for code in ExitCode)


def test_explain_json(cli) -> None:
    doc = cli("manifest", "explain", "--json", str(REPO / "examples/no-fly-list/enclaver.yaml")).json()
    [m] = doc["manifests"]
    topics = {row["topic"]: row["text"] for row in m["explanation"]}
    assert topics["KMS proxy"].startswith("127.0.0.1:9999")
    assert "169.254.169.254 (instance metadata)" in topics["egress"]


def test_explain_and_the_schema_name_the_default_runtime_image(cli) -> None:
    """Without `sources.sleeve` the release is built on enclaver's runtime image (x86_64), whose
    entrypoint starts the enclave: explain and the fields table say so, and that aarch64 has none."""
    import json

    from enclaver_rules.manifest.schema import schema_bytes
    from enclaver_rules.odyn_image.runtime_image import DEFAULT_TAG

    doc = cli("manifest", "explain", "--json", str(REPO / "examples/hello/enclaver.yaml")).json()
    [m] = doc["manifests"]
    base = {row["topic"]: row["text"] for row in m["explanation"]}["release base"]
    assert DEFAULT_TAG in base and "aarch64" in base
    sleeve = json.loads(schema_bytes())["properties"]["sources"]["properties"]["sleeve"]["description"]
    assert DEFAULT_TAG in sleeve and "aarch64" in sleeve and "doit runtime_image" in sleeve


def test_what_the_tasks_print_goes_to_stderr_so_the_json_document_parses(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`enclaver build --json` (and lock, verify-reproduce) run the rule set in-process: a task that
    prints (the odyn build prints its progress) must not put lines in front of the JSON on stdout."""
    import io

    from enclaver_rules import rules
    from enclaver_rules.cli.build import run_rule_set
    from enclaver_rules.cli.output import Output

    def chatty(root: str, **_: object) -> dict[str, object]:
        def task_build() -> dict[str, object]:
            return {"basename": "build:x", "actions": [lambda: print("odyn: static binary …") is None],
                    "verbosity": 2}

        return {"task_build": task_build, "DOIT_CONFIG": rules.doit_config(str(tmp_path / "cache"))}

    monkeypatch.setattr(rules, "tasks", chatty)
    out = Output(io.StringIO(), io.StringIO())
    assert run_rule_set(tmp_path / "enclaver.yaml", "x", tmp_path / "cache", "build:x", out) == ExitCode.OK
    assert out.stdout.getvalue() == "" and "odyn: static binary …" in out.stderr.getvalue()
