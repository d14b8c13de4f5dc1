"""Attestation end to end, as separate processes talk in the simulator: an EIF is built, the
simulated NSM serves its measurements (`enclaver attestation sim-nsm`), odyn runs an app that asks
odyn's attestation API for a document over its nonce, and `enclaver attestation verify` accepts
that document against the simulator's root and the EIF's measurements, and refuses it otherwise."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Result
from sim_helpers import built_measurements, sim_nsm

Cli = Callable[..., Result]
NONCE = bytes(range(32))
USER_DATA = b"order 66"

#: The app inside the "enclave": POST to odyn's API on 127.0.0.1, keep the document, exit 0.
APP = """
import base64, http.client, json, sys
port, out, nonce, user_data = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4].encode()
body = json.dumps({"nonce": base64.b64encode(nonce).decode(), "user_data": base64.b64encode(user_data).decode()})
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
conn.request("POST", "/v1/attestation", body, {"Content-Type": "application/json"})
answer = conn.getresponse()
data = answer.read()
if answer.status != 200 or answer.getheader("Content-Type") != "application/cbor":
    sys.exit(f"{answer.status} {answer.getheader('Content-Type')}: {data[:300]!r}")
open(out, "wb").write(data)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def measurements(cli: Cli, tmp_path: Path) -> Path:
    """The measurements file of an EIF really built here (the rule set writes the same shape)."""
    return built_measurements(cli, tmp_path / "eif")


@pytest.fixture
def sim_nsm_facts(tmp_path: Path, measurements: Path) -> Iterator[dict[str, Any]]:
    with sim_nsm(tmp_path / "nsm.sock", measurements, tmp_path / "ca") as facts:
        yield facts


def _odyn_attests(tmp_path: Path, nsm_socket: str) -> Path:
    port = _free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "enclaver.yaml").write_text(
        f"version: v1\nname: attested\ntarget: attested:latest\nsources: {{app: app:latest}}\n"
        f"api:\n  listen_port: {port}\n")
    (tmp_path / "vsock").mkdir()
    document = tmp_path / "doc.cbor"
    odyn = subprocess.run(
        [sys.executable, "-m", "odyn", "--transport", f"unix:{tmp_path / 'vsock'}", "--cid", "16", "--linger", "0.2",
         "--no-bootstrap", "--config-dir", str(config), "--nsm", f"unix:{nsm_socket}", "--",
         sys.executable, "-c", APP, str(port), str(document), NONCE.hex(), USER_DATA.decode()],
        capture_output=True, timeout=120)
    assert odyn.returncode == 0, (odyn.stdout, odyn.stderr)
    return document


def test_a_document_from_odyns_api_verifies_with_the_eifs_measurements(cli: Cli, tmp_path: Path, measurements: Path,
                                                                       sim_nsm_facts: dict[str, Any]) -> None:
    document = _odyn_attests(tmp_path, sim_nsm_facts["socket"])
    root = str(sim_nsm_facts["root"])
    checks = ["--nonce", NONCE.hex(), "--user-data", USER_DATA.hex()]

    good = cli("attestation", "verify", str(document), "--root", root, "--expect", str(measurements), *checks,
               "--json")
    assert good.code == 0, good.stdout + good.stderr
    report = good.json()
    expected = json.loads(measurements.read_text())["Measurements"]
    pcrs = report["document"]["pcrs"]
    assert {k: pcrs[k[3:]] for k in ("PCR0", "PCR1", "PCR2")} == {k: expected[k] for k in ("PCR0", "PCR1", "PCR2")}
    assert report["document"]["module_id"] == sim_nsm_facts["module_id"]

    # the same document against AWS's root (the default): the simulator's CA is not AWS's
    aws = cli("attestation", "verify", str(document), "--expect", str(measurements), *checks)
    assert aws.code == 1 and "root" in aws.stdout + aws.stderr

    # another build's PCR0: the failure names PCR0, expected vs got
    other = "ab" * 48
    wrong = cli("attestation", "verify", str(document), "--root", root, "--expect", str(measurements),
                "--pcr", f"0={other}", *checks)
    assert wrong.code == 1 and "PCR0" in wrong.stdout + wrong.stderr and other in wrong.stdout + wrong.stderr

    # a replayed document: another nonce is refused
    replay = cli("attestation", "verify", str(document), "--root", root, "--nonce", "00" * 32)
    assert replay.code == 1 and "nonce" in replay.stdout + replay.stderr
