"""An immutable KMS key policy from `enclaver trust --immutable` and from task `trust:<name>` with
ENC_KMS_IMMUTABLE=1: nobody may call kms:PutKeyPolicy once it is applied, and the lock-out
warning is on stderr (never in the policy on stdout)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

from conftest import Result
from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.policy import kms
from enclaver_rules.rules.common import BUILD, LATEST, MEASUREMENTS, POLICY, out_dir
from enclaver_rules.rules.discover import Enclave
from enclaver_rules.rules.trust import trust_tasks

ACCOUNT = "111122223333"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/KmsAdmin"
PCRS = {"PCR0": "a" * 96, "PCR1": "b" * 96, "PCR2": "c" * 96}
Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def no_kms_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in kms.VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def measurements(tmp_path: Path) -> Path:
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps({"Measurements": PCRS}))
    return path


def _nobody_may_change(policy: dict[str, Any]) -> None:
    for who in (ADMIN, f"arn:aws:iam::{ACCOUNT}:root", f"arn:aws:iam::{ACCOUNT}:role/Other",
                "arn:aws:iam::444455556666:root"):
        assert not kms.evaluate(policy, who, "kms:PutKeyPolicy").allowed, who
        assert kms.plaintext_paths(policy, who) == [], who


def test_the_cli_writes_an_immutable_policy_and_warns_on_stderr(cli: Cli, measurements: Path) -> None:
    result = cli("trust", str(measurements), "--kms-policy", "--immutable", "--account", ACCOUNT, "--admin", ADMIN)
    assert result.code == ExitCode.OK, result.stderr
    policy = json.loads(result.stdout)  # the policy alone: the warning is not in it
    _nobody_may_change(policy)
    assert "warning: this key policy is immutable" in result.stderr
    assert "--bypass-policy-lockout-safety-check" in result.stderr
    quiet = cli("-q", "trust", str(measurements), "--kms-policy", "--immutable", "--account", ACCOUNT)
    assert "--bypass-policy-lockout-safety-check" in quiet.stderr  # irreversible: said even with -q
    as_json = cli("trust", str(measurements), "--kms-policy", "--immutable", "--account", ACCOUNT, "--json")
    doc = json.loads(as_json.stdout)
    assert doc["Warnings"] == [kms.LOCKOUT_WARNING] and doc["KeyPolicy"] == json.loads(quiet.stdout)
    mutable = cli("trust", str(measurements), "--kms-policy", "--account", ACCOUNT, "--admin", ADMIN)
    assert kms.evaluate(json.loads(mutable.stdout), ADMIN, "kms:PutKeyPolicy").allowed
    assert "immutable" not in mutable.stderr


def test_the_variable_asks_for_it_too_and_a_bad_value_is_named(cli: Cli, measurements: Path) -> None:
    result = cli("trust", str(measurements), "--kms-policy", "--account", ACCOUNT, env={"ENC_KMS_IMMUTABLE": "1"})
    assert result.code == ExitCode.OK, result.stderr
    _nobody_may_change(json.loads(result.stdout))
    bad = cli("trust", str(measurements), "--kms-policy", "--account", ACCOUNT, env={"ENC_KMS_IMMUTABLE": "maybe"})
    assert bad.code == ExitCode.INVALID_INPUT and "ENC_KMS_IMMUTABLE" in bad.stderr and "Traceback" not in bad.stderr
    off = cli("trust", str(measurements), "--kms-policy", "--account", ACCOUNT, env={"ENC_KMS_IMMUTABLE": "0"})
    assert kms.evaluate(json.loads(off.stdout), f"arn:aws:iam::{ACCOUNT}:root", "kms:PutKeyPolicy").allowed


def test_an_immutable_policy_is_never_merged(cli: Cli, measurements: Path, tmp_path: Path) -> None:
    existing = tmp_path / "policy.json"
    existing.write_text(json.dumps(kms.key_policy({**PCRS, "PCR0": "d" * 96}, kms.Trust.for_account(ACCOUNT))))
    result = cli("trust", str(measurements), "--update", str(existing), "--immutable", "--account", ACCOUNT)
    assert result.code == ExitCode.INVALID_INPUT and "--immutable" in result.stderr


# -- the task -------------------------------------------------------------------------------------


def _no_build() -> Iterator[dict[str, Any]]:
    yield {"basename": "build", "name": "alpha", "actions": []}


def _doit(tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    cache = tmp_path / "cache"
    latest = out_dir(str(cache), "alpha") / LATEST
    latest.mkdir(parents=True, exist_ok=True)
    (latest / BUILD).write_text(json.dumps({"measurements": PCRS}))
    (latest / MEASUREMENTS).write_text(json.dumps({"Measurements": PCRS}))
    namespace = {
        "DOIT_CONFIG": {"backend": "sqlite3", "dep_file": str(tmp_path / "doit.sqlite3"), "verbosity": 2},
        "task_trust": lambda: trust_tasks([Enclave("alpha", str(tmp_path / "alpha" / "enclaver.yaml"))], str(cache)),
        "task_build": _no_build,
    }
    report = io.StringIO()
    code = DoitMain(ModuleTaskLoader(namespace), config_filenames=(),
                    extra_config={"GLOBAL": {"outfile": report}}).run(list(args))
    return int(code), report.getvalue(), latest


def test_the_task_reads_enc_kms_immutable_and_reruns_when_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ENC_KMS_ACCOUNT", ACCOUNT)
    code, report, latest = _doit(tmp_path, "trust:alpha")
    assert code == 0, report
    assert kms.evaluate(json.loads((latest / POLICY).read_text()), ADMIN, "kms:PutKeyPolicy").allowed  # root admin
    assert "immutable" not in capfd.readouterr().err
    monkeypatch.setenv("ENC_KMS_IMMUTABLE", "1")
    code, report, latest = _doit(tmp_path, "trust:alpha")
    assert code == 0, report
    _nobody_may_change(json.loads((latest / POLICY).read_text()))
    out, err = capfd.readouterr()
    assert "warning: this key policy is immutable" in err and "immutable" not in out
