"""`enclaver trust` and task `trust:<name>` without services: which registry host a reference is read
from, what stdout carries (the policy alone must be pipe-able), and the one rule for the KMS account
shared by the CLI and the task (no placeholder account: none given is an error)."""

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
from enclaver_rules.cli.trust import measurements_of
from enclaver_rules.policy import kms
from enclaver_rules.rules.common import BUILD, LATEST, MEASUREMENTS, POLICY, out_dir
from enclaver_rules.rules.discover import Enclave
from enclaver_rules.rules.trust import trust_tasks

ACCOUNT = "111122223333"
PCRS = {"PCR0": "a" * 96, "PCR1": "b" * 96, "PCR2": "c" * 96}
PRINCIPAL = f"arn:aws:iam::{ACCOUNT}:role/EnclaveParent"

Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def no_kms_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The outer environment's ENC_KMS_* must not decide a test."""
    for name in ("ENC_KMS_ACCOUNT", "ENC_KMS_ADMIN", "ENC_KMS_PRINCIPAL"):
        monkeypatch.delenv(name, raising=False)


# -- the registry API host ---------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the fake registry client: the test only wants to know how it was built."""


@pytest.mark.parametrize(("ref", "host", "insecure"), [
    ("docker.io/library/x", "registry-1.docker.io", False),
    ("x", "registry-1.docker.io", False),
    ("index.docker.io/someone/x:1", "registry-1.docker.io", False),
    ("localhost:5000/x", "localhost:5000", False),
    ("registry.internal:5000/team/x", "registry.internal:5000", True),
])
def test_a_release_image_not_in_the_store_is_read_from_its_registrys_api_host(
        ref: str, host: str, insecure: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker Hub's name (docker.io) serves no registry API: the client must talk to registry-1.docker.io,
    the host `enclaver image pull` uses (Reference.api_host)."""
    built: list[tuple[str, bool]] = []

    def fake_registry(host: str, *, insecure: bool = False, **_: Any) -> Any:
        built.append((host, insecure))
        raise _Stop

    monkeypatch.setattr("enclaver_rules.oci.registry.Registry", fake_registry)
    monkeypatch.chdir(tmp_path)  # `x` must not name a file here
    with pytest.raises(_Stop):
        measurements_of(ref, str(tmp_path / "empty-store"), insecure=frozenset({"registry.internal:5000"}))
    assert built == [(host, insecure)]


# -- what stdout carries ----------------------------------------------------------------------


@pytest.fixture
def measurements(tmp_path: Path) -> Path:
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps({"Measurements": PCRS}))
    return path


def test_kms_policy_without_json_prints_only_the_policy_on_stdout(cli: Cli, measurements: Path) -> None:
    """`enclaver trust IMG --kms-policy > policy.json` must give a valid policy: one JSON document,
    the policy itself; the measurements and where they came from are for people, on stderr."""
    result = cli("trust", str(measurements), "--kms-policy", "--account", ACCOUNT)
    assert result.code == ExitCode.OK, result.stderr
    policy = json.loads(result.stdout)  # one document: the concatenation of two would not parse
    assert policy == kms.key_policy(PCRS, kms.Trust.for_account(ACCOUNT))
    assert PCRS["PCR0"] in result.stderr and f"read from {measurements}" in result.stderr


def test_kms_policy_with_json_is_still_one_document_with_everything(cli: Cli, measurements: Path) -> None:
    result = cli("trust", str(measurements), "--kms-policy", "--account", ACCOUNT, "--json")
    assert result.code == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["Measurements"] == PCRS and doc["Source"] == f"read from {measurements}"
    assert doc["KeyPolicy"] == kms.key_policy(PCRS, kms.Trust.for_account(ACCOUNT))


def test_update_without_json_prints_the_merged_policy_on_stdout_and_the_diff_on_stderr(
        cli: Cli, measurements: Path, tmp_path: Path) -> None:
    earlier = {"PCR0": "d" * 96, "PCR1": "b" * 96, "PCR2": "c" * 96}
    existing = tmp_path / "policy.json"
    existing.write_text(json.dumps(kms.key_policy(earlier, kms.Trust.for_account(ACCOUNT))))
    result = cli("trust", str(measurements), "--update", str(existing), "--account", ACCOUNT)
    assert result.code == ExitCode.OK, result.stderr
    policy = json.loads(result.stdout)
    deny = next(s for s in policy["Statement"] if s["Effect"] == "Deny")
    assert deny["Condition"]["StringNotEqualsIgnoreCase"][kms.IMAGE_KEY] == sorted([earlier["PCR0"], PCRS["PCR0"]])
    assert "+++ policy (after)" in result.stderr and "+++" not in result.stdout


def test_measurements_alone_are_still_one_document_on_stdout(cli: Cli, measurements: Path) -> None:
    result = cli("trust", str(measurements))
    assert result.code == ExitCode.OK, result.stderr
    assert json.loads(result.stdout) == {"Measurements": PCRS}


# -- one rule for the account: the CLI and the task ------------------------------------------


def test_the_cli_takes_the_account_from_enc_kms_account_when_not_given(cli: Cli, measurements: Path) -> None:
    result = cli("trust", str(measurements), "--kms-policy",
                 env={"ENC_KMS_ACCOUNT": ACCOUNT, "ENC_KMS_PRINCIPAL": PRINCIPAL})
    assert result.code == ExitCode.OK, result.stderr
    assert json.loads(result.stdout) == kms.key_policy(PCRS, kms.Trust.for_account(ACCOUNT, principal=PRINCIPAL))
    flag = cli("trust", str(measurements), "--kms-policy", "--account", "444455556666",
               env={"ENC_KMS_ACCOUNT": ACCOUNT})  # the flag wins over the variable
    assert flag.code == ExitCode.OK and "arn:aws:iam::444455556666:root" in flag.stdout


def test_the_cli_refuses_a_policy_without_an_account_and_says_both_ways_to_give_it(
        cli: Cli, measurements: Path) -> None:
    result = cli("trust", str(measurements), "--kms-policy")
    assert result.code == ExitCode.INVALID_INPUT and result.stdout == ""
    assert "--account" in result.stderr and "ENC_KMS_ACCOUNT" in result.stderr


@pytest.mark.parametrize(("env", "named"), [
    ({"ENC_KMS_ACCOUNT": "1234"}, "ENC_KMS_ACCOUNT"),
    ({"ENC_KMS_ACCOUNT": ACCOUNT, "ENC_KMS_PRINCIPAL": "EnclaveParent"}, "ENC_KMS_PRINCIPAL"),
    ({"ENC_KMS_ACCOUNT": ACCOUNT, "ENC_KMS_ADMIN": "arn:aws:iam::1:root"}, "ENC_KMS_ADMIN"),
])
def test_a_bad_variable_is_named_by_its_name(cli: Cli, measurements: Path, env: dict[str, str], named: str) -> None:
    result = cli("trust", str(measurements), "--kms-policy", env=env)
    assert result.code == ExitCode.INVALID_INPUT and named in result.stderr, result.stderr


def test_a_bad_account_flag_is_named_by_the_flag(cli: Cli, measurements: Path) -> None:
    result = cli("trust", str(measurements), "--kms-policy", "--account", "12345", env={"ENC_KMS_ACCOUNT": ACCOUNT})
    assert result.code == ExitCode.INVALID_INPUT and "--account" in result.stderr and "12-digit" in result.stderr


def _no_build() -> Iterator[dict[str, Any]]:
    yield {"basename": "build", "name": "alpha", "actions": []}


def _repo(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """The trust tasks over a hand-made build entry for `alpha`; `build:alpha` does nothing here."""
    cache = tmp_path / "cache"
    latest = out_dir(str(cache), "alpha") / LATEST
    latest.mkdir(parents=True)
    (latest / BUILD).write_text(json.dumps({"measurements": PCRS}))
    (latest / MEASUREMENTS).write_text(json.dumps({"Measurements": PCRS}))
    enclaves = [Enclave("alpha", str(tmp_path / "alpha" / "enclaver.yaml"))]
    namespace = {
        "DOIT_CONFIG": {"backend": "sqlite3", "dep_file": str(tmp_path / "doit.sqlite3"), "verbosity": 2},
        "task_trust": lambda: trust_tasks(enclaves, str(cache)),
        "task_build": _no_build,
    }
    return namespace, latest


def _doit(namespace: dict[str, Any], *args: str) -> tuple[int, str]:
    """doit as a library: its exit code and its report (given a stream: its default is the
    sys.stdout of when doit was imported, which pytest has long replaced)."""
    report = io.StringIO()
    code = DoitMain(ModuleTaskLoader(namespace), config_filenames=(),
                    extra_config={"GLOBAL": {"outfile": report}}).run(list(args))
    return int(code), report.getvalue()


def test_the_task_fails_cleanly_without_an_account(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """No made-up 000000000000: a policy naming an account nobody owns looks valid and cannot be applied."""
    namespace, latest = _repo(tmp_path)
    code, report = _doit(namespace, "trust:alpha")
    out, err = capfd.readouterr()
    assert code == 1
    assert "ENC_KMS_ACCOUNT: a KMS key policy needs the AWS account that owns the key" in report
    assert "set ENC_KMS_ACCOUNT=<12-digit AWS account ID>" in report
    assert "Traceback" not in report + out + err
    assert not (latest / POLICY).exists()


def test_the_task_and_the_cli_write_the_same_policy_for_the_same_settings(
        tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    namespace, latest = _repo(tmp_path)
    from_cli = cli("trust", str(latest), "--kms-policy", "--account", ACCOUNT, "--principal", PRINCIPAL)
    assert from_cli.code == ExitCode.OK, from_cli.stderr
    monkeypatch.setenv("ENC_KMS_ACCOUNT", ACCOUNT)
    monkeypatch.setenv("ENC_KMS_PRINCIPAL", PRINCIPAL)
    code, report = _doit(namespace, "trust:alpha")
    assert code == 0, report
    assert json.loads((latest / POLICY).read_text()) == json.loads(from_cli.stdout)
    from_env = cli("trust", str(latest), "--kms-policy", env={"ENC_KMS_ACCOUNT": ACCOUNT, "ENC_KMS_PRINCIPAL": PRINCIPAL})
    assert json.loads(from_env.stdout) == json.loads(from_cli.stdout)
