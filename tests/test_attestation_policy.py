"""The caller's policy (expected PCRs, nonce, user_data, public_key, debug mode), the report, PCR helpers."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import pytest

from attestation_helpers import DATA, NOW, default_chain, sample_document, signed
from enclaver_rules.attestation import pcrs
from enclaver_rules.attestation.roots import aws_root
from enclaver_rules.attestation.verify import Report, verify
from enclaver_rules.errors import InvalidInput

DEBUG_DOC = (DATA / "evervault_2023-09-18_debug.cbor").read_bytes()
REAL_DOC = (DATA / "oyster-verifier_2024-08-07.cbor").read_bytes()
REAL_PCR0 = bytes.fromhex("5fec1b73727425848d725d68f4a062c634061a035067bd0b9a6dc73e25ed5013dfe7ccbf8a7e9857eceb0841c4cb6ae6")


def _verify(data: bytes | None = None, **policy: object) -> Report:
    return verify(data or signed(), roots=[default_chain().root.certificate], at=NOW, **policy)  # type: ignore[arg-type]


def test_expected_pcrs_that_match() -> None:
    doc = sample_document()
    report = _verify(expect_pcrs={0: doc.pcrs[0], 4: doc.pcrs[4]})
    assert report.ok and report.checks[-1].name == "pcrs" and "PCR0, PCR4" in report.checks[-1].detail


def test_expected_pcrs_that_differ_are_all_named() -> None:
    doc = sample_document()
    report = _verify(expect_pcrs={0: bytes(48), 1: doc.pcrs[1], 2: b"\x07" * 48, 20: b"\x01" * 48})
    failure = report.failure
    assert failure is not None and failure.code == "E_PCR" and failure.name == "pcrs"
    assert f"PCR0 expected {'00' * 48} got {doc.pcrs[0].hex()}" in failure.detail
    assert "PCR2 expected" in failure.detail and "PCR1 " not in failure.detail
    assert "PCR20 expected" in failure.detail and "not in the document" in failure.detail
    assert set(failure.facts["differ"]) == {"0", "2", "20"}
    assert failure.facts["differ"]["20"]["got"] is None


def test_a_debug_document_fails_expected_pcrs_even_if_they_match() -> None:
    report = verify(DEBUG_DOC, roots=[aws_root()], at="document", expect_pcrs={0: bytes(48)})
    assert report.failure is not None and report.failure.code == "E_PCR"
    assert "debug-mode enclave" in report.failure.detail


def test_debug_documents_are_flagged_and_refused_on_request() -> None:
    allowed = verify(DEBUG_DOC, roots=[aws_root()], at="document")
    assert allowed.ok and allowed.debug and "debug-mode" in allowed.checks[-1].detail
    refused = verify(DEBUG_DOC, roots=[aws_root()], at="document", allow_debug=False)
    assert refused.failure is not None and refused.failure.code == "E_DEBUG"
    real = verify(REAL_DOC, roots=[aws_root()], at="document", allow_debug=False, expect_pcrs={0: REAL_PCR0})
    assert real.ok and real.debug is False


@pytest.mark.parametrize("name, code, good", [("nonce", "E_NONCE", bytes(20)), ("user_data", "E_USER_DATA", b"hello"),
                                              ("public_key", "E_PUBLIC_KEY", None)])
def test_nonce_user_data_public_key(name: str, code: str, good: bytes | None) -> None:
    if good is not None:
        assert _verify(**{name: good}).ok
    report = _verify(**{name: b"other"})
    assert report.failure is not None and report.failure.code == code
    assert report.failure.facts["expected"] == b"other".hex()


def test_policy_checks_all_run() -> None:
    report = _verify(expect_pcrs={0: bytes(48)}, nonce=b"x", user_data=b"y", public_key=b"z")
    assert [c.name for c in report.checks if not c.ok] == ["pcrs", "nonce", "user-data", "public-key"]


def test_no_policy_after_a_cryptographic_failure() -> None:
    bad = bytearray(signed())
    bad[-1] ^= 1
    report = _verify(bytes(bad), nonce=b"x")
    assert report.checks[-1].name == "signature" and not report.checks[-1].ok


def test_report_json() -> None:
    report = verify(REAL_DOC, roots=[aws_root()], at="document", nonce=b"\x01")
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["ok"] is False and doc["failure"]["code"] == "E_NONCE" and doc["debug"] is False
    assert doc["at"] == "2024-08-07T06:38:09.640Z"
    assert doc["document"]["timestamp"] == 1723012689640 and doc["document"]["time"] == doc["at"]
    assert doc["document"]["pcrs"]["0"] == REAL_PCR0.hex() and doc["document"]["nonce"] is None
    assert [c["name"] for c in doc["checks"]][:4] == ["cbor", "envelope", "protected", "payload"]
    undecodable = verify(b"\xff", roots=[aws_root()], at="document").to_json()
    assert undecodable["document"] is None and undecodable["at"] is None and undecodable["failure"]["code"] == "E_CBOR"


def test_at_must_be_aware() -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify(REAL_DOC, roots=[aws_root()], at=datetime(2024, 8, 7))
    with pytest.raises(ValueError, match="'now'"):
        verify(REAL_DOC, roots=[aws_root()], at="now")  # type: ignore[arg-type]


def test_pcr_arithmetic() -> None:
    assert pcrs.extend(pcrs.ZERO, b"x") == hashlib.sha384(bytes(48) + b"x").digest()
    assert pcrs.of_string("i-0123") == pcrs.extend(bytes(48), b"i-0123")
    assert pcrs.is_debug({0: bytes(48), 1: bytes(48), 2: bytes(48), 4: b"\x01" * 48})
    assert not pcrs.is_debug({0: bytes(48), 1: bytes(48), 2: b"\x01" * 48})
    assert not pcrs.is_debug({0: bytes(48), 1: bytes(48)})  # PCR2 absent: not provably debug


def test_parse_measurements_both_shapes() -> None:
    nested = {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": "00" * 48, "PCR8": "ab" * 48}}
    assert pcrs.parse_measurements(nested) == {0: bytes(48), 8: b"\xab" * 48}
    assert pcrs.parse_measurements({"PCR1": "11" * 32, "pcr2": "22" * 64}) == {1: b"\x11" * 32, 2: b"\x22" * 64}


@pytest.mark.parametrize("data, field", [
    ({"Measurements": {"PCR0": "zz" * 48}}, "Measurements.PCR0"), ({"PCR0": "00" * 47}, "PCR0"),
    ({"PCR0": 5}, "PCR0"), ({"PCR32": "00" * 48}, "PCR32"), ({"PCR" + "9" * 5000: "00"}, "PCR" + "9" * 5000), ({"PCRx": "00" * 48}, "PCRx"),
    ({"Measurements": []}, "Measurements"), ({"HashAlgorithm": "x"}, ""),
])
def test_parse_measurements_names_the_bad_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as e:
        pcrs.parse_measurements(data, "m.json")
    assert e.value.diagnostics[0].field == field and e.value.diagnostics[0].file == "m.json"
