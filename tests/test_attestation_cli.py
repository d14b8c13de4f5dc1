"""`enclaver attestation verify`: exit codes, input formats, --json, expectations, flag errors."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from attestation_helpers import DATA, NOW, default_chain, sample_document, signed
from enclaver_rules.cli import attestation as attestation_cmd
from enclaver_rules.cli.main import build_parser

REAL = DATA / "oyster-verifier_2024-08-07.cbor"
B64 = DATA / "evervault_2023-09-18_debug.b64"
AT_DOC = ("--at", "document")
PCR0 = "5fec1b73727425848d725d68f4a062c634061a035067bd0b9a6dc73e25ed5013dfe7ccbf8a7e9857eceb0841c4cb6ae6"


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_help_documents_exit_codes(cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("attestation", "verify", "--help").code == 0  # argparse prints help to sys.stdout
    text = capsys.readouterr().out
    assert "exit codes:" in text and "  2 " in text and "--json" in text
    assert "truncated" in text  # where undecodable input goes


def test_a_real_document_is_valid_at_its_own_time(cli) -> None:
    result = cli("attestation", "verify", str(REAL), *AT_DOC)
    assert result.code == 0, result.stdout + result.stderr
    assert "valid attestation document" in result.lines[0]
    assert f"PCR0       {PCR0}" in result.stdout
    assert "i-084e1dd2f1b2c529b-enc0190fecc5b166251" in result.stdout
    assert "2024-08-07T06:38:09.640Z" in result.stdout and "debug      no" in result.stdout
    assert sum(line.startswith("  ok ") for line in result.lines) == 9


def test_a_real_document_is_refused_later(cli) -> None:
    for at in (["--at", "2026-12-01T00:00:00Z"], []):  # [] is now: every vector's leaf expired long ago
        result = cli("attestation", "verify", str(REAL), *at)
        assert result.code == 1
        assert "INVALID: validity:" in result.lines[0] and "  FAIL validity" in result.stdout


def test_base64_hex_and_stdin(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("attestation", "verify", str(B64), *AT_DOC).code == 0
    hex_file = tmp_path / "doc.hex"
    hex_file.write_text(REAL.read_bytes().hex().upper() + "\n")
    assert cli("attestation", "verify", str(hex_file), *AT_DOC).code == 0
    wrapped = tmp_path / "doc.b64"
    text = base64.b64encode(REAL.read_bytes()).decode()
    wrapped.write_text("\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n")
    assert cli("attestation", "verify", str(wrapped), *AT_DOC).code == 0
    _stdin(monkeypatch, REAL.read_bytes())
    assert cli("attestation", "verify", "-", *AT_DOC).code == 0
    _stdin(monkeypatch, base64.urlsafe_b64encode(REAL.read_bytes()).rstrip(b"="))
    assert cli("attestation", "verify", "-", *AT_DOC).code == 0


@pytest.mark.parametrize("name, content", [
    ("truncated", (DATA / "negative/truncated_half.cbor").read_bytes()),
    ("trailing", (DATA / "negative/trailing_byte.cbor").read_bytes()),
    ("not-base64", b"hello, world!\n"), ("json", b'{"doc": 1}'), ("empty", b""), ("oversize", b"\x84" + bytes(70000)),
])
def test_unusable_input_is_exit_2(cli, tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = cli("attestation", "verify", str(path), *AT_DOC)
    assert result.code == 2, result.stdout + result.stderr


def test_a_missing_file_is_exit_2(cli, tmp_path: Path) -> None:
    result = cli("attestation", "verify", str(tmp_path / "nope.cbor"))
    assert result.code == 2 and "nope.cbor: cannot read it" in result.stderr


@pytest.mark.parametrize("name", ["tag17_mac0.cbor", "pcr0_bitflip.cbor", "alg_es256.cbor", "root_impostor.cbor"])
def test_a_refused_document_is_exit_1(cli, name: str) -> None:
    assert cli("attestation", "verify", str(DATA / "negative" / name), *AT_DOC).code == 1


def test_json(cli) -> None:
    result = cli("attestation", "verify", str(REAL), *AT_DOC, "--json")
    doc = result.json()
    assert result.code == 0 and doc["version"] == 1 and doc["valid"] is True and doc["ok"] is True
    assert doc["source"] == str(REAL) and doc["failure"] is None and doc["debug"] is False
    assert doc["document"]["pcrs"]["0"] == PCR0
    assert doc["document"]["timestamp"] == 1723012689640 and doc["document"]["time"] == "2024-08-07T06:38:09.640Z"
    assert doc["document"]["certificate"].startswith("30")
    assert [c["name"] for c in doc["checks"]][-2:] == ["signature", "debug"]
    assert all(c["ok"] for c in doc["checks"])
    bad = cli("attestation", "verify", str(DATA / "negative/truncated_half.cbor"), "--json")
    assert bad.code == 2 and bad.json()["failure"]["code"] == "E_CBOR"


def _measurements(tmp_path: Path, pcr0: str, nested: bool = True) -> Path:
    pcrs = {"PCR0": pcr0, "PCR1": "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f"}
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", **pcrs}} if nested else pcrs))
    return path


def test_expect_measurements(cli, tmp_path: Path) -> None:
    assert cli("attestation", "verify", str(REAL), *AT_DOC, "--expect", str(_measurements(tmp_path, PCR0))).code == 0
    assert cli("attestation", "verify", str(REAL), *AT_DOC, "--expect", str(_measurements(tmp_path, PCR0, False))).code == 0
    other = "ab" * 48
    result = cli("attestation", "verify", str(REAL), *AT_DOC, "--expect", str(_measurements(tmp_path, other)))
    assert result.code == 1
    assert f"PCR0 expected {other} got {PCR0}" in result.lines[0] and "PCR1" not in result.lines[0]
    as_json = cli("attestation", "verify", str(REAL), *AT_DOC, "--expect", str(_measurements(tmp_path, other)), "--json")
    assert as_json.json()["failure"]["differ"] == {"0": {"expected": other, "got": PCR0}}


def test_pcr_flags_override_expect(cli, tmp_path: Path) -> None:
    expect = str(_measurements(tmp_path, "ab" * 48))
    assert cli("attestation", "verify", str(REAL), *AT_DOC, "--expect", expect, "--pcr", f"0={PCR0}").code == 0
    assert cli("attestation", "verify", str(REAL), *AT_DOC, "--pcr", f"PCR0={PCR0}").code == 0
    assert cli("attestation", "verify", str(REAL), *AT_DOC, "--pcr", f"3={PCR0}").code == 1


def test_expected_pcrs_refuse_a_debug_document(cli) -> None:
    result = cli("attestation", "verify", str(B64), *AT_DOC, "--pcr", f"0={'00' * 48}")
    assert result.code == 1 and "debug-mode enclave" in result.lines[0]


@pytest.mark.parametrize("flag, words", [
    ("x=00", "--pcr"), ("32=" + "00" * 48, "--pcr"), ("9" * 5000 + "=00", "--pcr"), ("0", "--pcr"), ("0=abc", "--pcr 0"), ("0=" + "zz" * 48, "--pcr 0"),
])
def test_pcr_flag_errors(cli, flag: str, words: str) -> None:
    result = cli("attestation", "verify", str(REAL), *AT_DOC, "--pcr", flag)
    assert result.code == 2 and words in result.stderr


@pytest.mark.parametrize("content", ['{"Measurements": {"PCR0": "zz"}}', "not json", "[1]"])
def test_bad_measurements_file_is_exit_2(cli, tmp_path: Path, content: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(content)
    result = cli("attestation", "verify", str(REAL), *AT_DOC, "--expect", str(path))
    assert result.code == 2 and "m.json" in result.stderr
    assert cli("attestation", "verify", str(REAL), *AT_DOC, "--expect", str(tmp_path / "missing.json")).code == 2


def test_nonce_and_user_data(cli, tmp_path: Path) -> None:
    c = default_chain()
    root = tmp_path / "root.pem"
    root.write_bytes(c.root.certificate.public_bytes(Encoding.PEM))
    doc = tmp_path / "sim.cbor"
    doc.write_bytes(signed(sample_document(nonce=b"\x01\x02", user_data=b"hi")))
    base = ("attestation", "verify", str(doc), "--root", str(root), "--at", NOW.isoformat())
    assert cli(*base, "--nonce", "0102", "--user-data", b"hi".hex()).code == 0
    wrong = cli(*base, "--nonce", "0103")
    assert wrong.code == 1 and "INVALID: nonce: nonce expected 0103 got 0102" in wrong.lines[0]
    assert cli(*base, "--user-data", "00").code == 1
    assert cli(*base, "--public-key", "00").code == 1  # the document has none
    assert cli(*base, "--nonce", "xyz").code == 2


def test_roots(cli, tmp_path: Path) -> None:
    c = default_chain()
    root = tmp_path / "root.pem"
    root.write_bytes(c.root.certificate.public_bytes(Encoding.PEM) + (DATA / "root.pem").read_bytes())
    doc = tmp_path / "sim.cbor"
    doc.write_bytes(signed())
    assert cli("attestation", "verify", str(doc), "--at", NOW.isoformat()).code == 1  # AWS's root only: E_ROOT
    assert cli("attestation", "verify", str(doc), "--root", str(root), "--at", NOW.isoformat()).code == 0
    assert cli("attestation", "verify", str(REAL), "--root", str(root), *AT_DOC).code == 0  # the PEM holds both
    bad = tmp_path / "bad.pem"
    bad.write_text("junk")
    result = cli("attestation", "verify", str(REAL), "--root", str(bad))
    assert result.code == 2 and "bad.pem" in result.stderr


def test_at(cli) -> None:
    naive = cli("attestation", "verify", str(REAL), "--at", "2024-08-07T06:38:09.640")
    assert naive.code == 0 and "taken as UTC" in naive.stderr
    assert cli("attestation", "verify", str(REAL), "--at", "2024-08-07T08:38:09+02:00").code == 0
    assert cli("attestation", "verify", str(REAL), "--at", "2024-08-07T10:00:00Z").code == 1
    result = cli("attestation", "verify", str(REAL), "--at", "yesterday")
    assert result.code == 2 and "--at" in result.stderr


def test_more_subcommands_can_plug_in(monkeypatch: pytest.MonkeyPatch) -> None:
    def add_hello(group, common) -> None:  # type: ignore[no-untyped-def]
        group.add_parser("hello", parents=[common]).set_defaults(func=lambda args, out: 0)

    monkeypatch.setattr(attestation_cmd, "EXTRA_SUBCOMMANDS", [add_hello])
    args = build_parser().parse_args(["attestation", "hello"])
    assert args.attestation_command == "hello"
