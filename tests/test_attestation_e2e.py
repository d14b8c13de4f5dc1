"""Attestation end to end, as separate processes talk in the simulator: an EIF is built, the
simulated NSM serves its measurements (`enclaver attestation sim-nsm`), odyn runs an app that asks
odyn's attestation API for a document over its nonce, and `enclaver attestation verify` accepts
that document against the simulator's root and the EIF's measurements, and refuses it otherwise."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Result
from enclaver_rules.eif.blobs import write_dev_blobs
from enclaver_rules.oci.layer import Entry
from oci_helpers import make_layout

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
    make_layout(str(tmp_path / "layout"), "v", [[Entry.file("bin/app", b"attested app", 0o755)]], cmd=("/bin/app",))
    write_dev_blobs(tmp_path / "blobs", "x86_64")
    built = cli("eif", "build", "--image", f"oci:{tmp_path / 'layout'}:v", "--blobs", str(tmp_path / "blobs"),
                "-o", str(tmp_path / "app.eif"), "--cache-dir", str(tmp_path / "cache"), "--json")
    assert built.code == 0, built.stderr
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps({"Measurements": built.json()["Measurements"]}))
    return path


@pytest.fixture
def sim_nsm(tmp_path: Path, measurements: Path) -> Iterator[dict[str, str]]:
    """`enclaver attestation sim-nsm` as its own process, as `enclaver run --simulate` will start it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "enclaver_rules.cli", "attestation", "sim-nsm", "--socket", str(tmp_path / "nsm.sock"),
         "--measurements", str(measurements), "--state", str(tmp_path / "ca"), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    found: queue.Queue[dict[str, str]] = queue.Queue()

    def read() -> None:  # the JSON document is printed once the socket listens
        lines = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("}"):
                found.put(json.loads("".join(lines)))
                return

    threading.Thread(target=read, daemon=True).start()
    try:
        facts = found.get(timeout=60)
    except queue.Empty:
        process.kill()
        raise AssertionError(f"sim-nsm did not start: {process.communicate()[1]}") from None
    yield facts
    process.terminate()
    process.communicate(timeout=30)


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
                                                                       sim_nsm: dict[str, str]) -> None:
    document = _odyn_attests(tmp_path, sim_nsm["socket"])
    root = str(sim_nsm["root"])
    checks = ["--nonce", NONCE.hex(), "--user-data", USER_DATA.hex()]

    good = cli("attestation", "verify", str(document), "--root", root, "--expect", str(measurements), *checks,
               "--json")
    assert good.code == 0, good.stdout + good.stderr
    report = good.json()
    expected = json.loads(measurements.read_text())["Measurements"]
    pcrs = report["document"]["pcrs"]
    assert {k: pcrs[k[3:]] for k in ("PCR0", "PCR1", "PCR2")} == {k: expected[k] for k in ("PCR0", "PCR1", "PCR2")}
    assert report["document"]["module_id"] == sim_nsm["module_id"]

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
