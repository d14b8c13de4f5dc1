"""`enclaver trust` and task `trust:<name>` without services: which registry host a reference is read
from, what stdout carries (the policy alone must be pipe-able), and the one rule for the KMS account
shared by the CLI and the task (no placeholder account: none given is an error)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Result
from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.trust import measurements_of
from enclaver_rules.policy import kms

ACCOUNT = "111122223333"
PCRS = {"PCR0": "a" * 96, "PCR1": "b" * 96, "PCR2": "c" * 96}

Cli = Callable[..., Result]


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
