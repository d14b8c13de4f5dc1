"""`enclaver attestation ca` and `enclaver attestation sim-nsm`: the CA made once and shown, the
simulated NSM served until a signal, answering odyn's client with documents that verify."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import enclaver_rules.cli.attestation_sim  # noqa: F401 - adds `ca` and `sim-nsm` to the attestation group
from conftest import Result
from enclaver_rules.attestation import verify
from odyn.nsm import NsmClient, NsmSocket

MEASUREMENTS = {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": "b0" * 48, "PCR1": "b1" * 48,
                                 "PCR2": "b2" * 48}}
Cli = Callable[..., Result]


@pytest.fixture
def measurements(tmp_path: Path) -> Path:
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps(MEASUREMENTS))
    return path


def test_ca_is_made_once_and_shown(cli: Cli, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = cli("attestation", "ca", "--state", str(state), "--json")
    assert first.code == 0, first.stderr
    facts = first.json()
    assert facts["created"] is True and facts["state"] == str(state) and facts["root"] == str(state / "root.pem")
    der = x509.load_pem_x509_certificate((state / "root.pem").read_bytes()).public_bytes(Encoding.DER)
    assert facts["root_sha256"] == hashlib.sha256(der).hexdigest()
    again = cli("attestation", "ca", "--state", str(state))
    assert again.code == 0 and f"root_sha256  {facts['root_sha256']}" in again.lines
    pem = cli("attestation", "ca", "--state", str(state), "--print-root")
    assert pem.code == 0 and pem.stdout == (state / "root.pem").read_text()
    assert facts["root_sha256"] in pem.stderr


def test_ca_takes_its_directory_from_the_environment(cli: Cli, tmp_path: Path) -> None:
    result = cli("attestation", "ca", "--json", env={"ENC_SIM_STATE": str(tmp_path / "env-state")})
    assert result.code == 0 and result.json()["state"] == str(tmp_path / "env-state")


def test_ca_refuses_an_unsafe_directory(cli: Cli, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert cli("attestation", "ca", "--state", str(state)).code == 0
    os.chmod(state / "root.key", 0o644)
    result = cli("attestation", "ca", "--state", str(state))
    assert result.code == 2 and "can be read by others" in result.stderr and "chmod 600" in result.stderr


@pytest.mark.parametrize(("content", "extra", "text"), [
    (None, [], "cannot read it"),
    ("{not json", [], "not JSON"),
    (json.dumps({"Measurements": {"PCR1": "b1" * 48, "PCR2": "b2" * 48}}), [], "lack PCR0"),
    (json.dumps(MEASUREMENTS), ["--instance-id", "host-1"], "not an EC2 instance id"),
])
def test_sim_nsm_refuses_bad_input_before_serving(cli: Cli, tmp_path: Path, content: str | None, extra: list[str],
                                                  text: str) -> None:
    path = tmp_path / "measurements.json"
    if content is not None:
        path.write_text(content)
    socket_path = tmp_path / "nsm.sock"
    result = cli("attestation", "sim-nsm", "--socket", str(socket_path), "--measurements", str(path),
                 "--state", str(tmp_path / "state"), *extra)
    assert result.code == 2 and text in result.stderr, result.stderr
    assert not socket_path.exists()


LAUNCH = ("import sys, enclaver_rules.cli.attestation_sim; from enclaver_rules.cli.main import main; "
          "sys.exit(main(sys.argv[1:]))")


def _start(tmp_path: Path, measurements: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "attestation", "sim-nsm", "--socket", str(tmp_path / "nsm.sock"),
         "--measurements", str(measurements), "--state", str(tmp_path / "state"), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    stdout, found = process.stdout, queue.Queue[dict[str, object]]()
    assert stdout is not None

    def read() -> None:  # the JSON document is printed once the socket listens
        lines = []
        for line in stdout:
            lines.append(line)
            if line.startswith("}"):
                found.put(json.loads("".join(lines)))
                return

    threading.Thread(target=read, daemon=True).start()
    try:
        return process, found.get(timeout=30)
    except queue.Empty:
        process.kill()
        raise AssertionError(f"sim-nsm did not start: {process.communicate()[1]}") from None


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sim_nsm_serves_until_a_signal(tmp_path: Path, measurements: Path, stop: signal.Signals) -> None:
    process, facts = _start(tmp_path, measurements, "--role-arn", "arn:aws:iam::111122223333:role/r")
    try:
        assert facts["socket"] == str(tmp_path / "nsm.sock") and facts["debug_mode"] is False
        client = NsmClient(NsmSocket(str(facts["socket"])))
        assert client.describe_nsm().module_id == facts["module_id"]
        document = client.attestation(nonce=b"cli")
        root = x509.load_pem_x509_certificate(Path(str(facts["root"])).read_bytes())
        expected = {i: bytes.fromhex(MEASUREMENTS["Measurements"][f"PCR{i}"]) for i in (0, 1, 2)}
        report = verify.verify(document, roots=[root], at="document", expect_pcrs=expected, nonce=b"cli")
        assert report.ok, report.failure
    finally:
        process.send_signal(stop)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "stopped" in err and not (tmp_path / "nsm.sock").exists()


def test_sim_nsm_in_debug_mode(tmp_path: Path, measurements: Path) -> None:
    process, facts = _start(tmp_path, measurements, "--debug-mode", "--instance-id", "i-0123456789abcdef0")
    try:
        assert facts["debug_mode"] is True and str(facts["module_id"]).startswith("i-0123456789abcdef0-enc")
        pcr0 = NsmClient(NsmSocket(str(facts["socket"]))).describe_pcr(0)
        assert pcr0.lock and pcr0.data == bytes(48)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert process.returncode == 0
