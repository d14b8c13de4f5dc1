"""The verifier on public data: 15 real documents (and one derived), the negatives of EXPECTED.md, the AWS root."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from attestation_helpers import DATA, DERIVED, NEGATIVE, REAL
from enclaver_rules.attestation import roots
from enclaver_rules.attestation.errors import AttestationError
from enclaver_rules.attestation.verify import decode, verify
from enclaver_rules.errors import InvalidInput, OperationFailed

LATER = datetime(2026, 12, 1, tzinfo=UTC)  # after every vector's leaf expired


def _expected() -> dict[str, set[str]]:
    """file -> the acceptable codes: the documented one, plus any alternative EXPECTED.md names."""
    out = {}
    for line in (DATA / "negative" / "EXPECTED.md").read_text().splitlines():
        match = re.match(r"- `([^`]+)` .*?-> FAIL (E_[A-Z_]+):(.*)", line)
        if match:
            name, code, rest = match.groups()
            alternatives = re.findall(r"(?:reports|report) (E_[A-Z_]+)", rest)
            out[name] = {code, *alternatives}
    return out


EXPECTED = _expected()


def test_every_negative_has_an_expectation() -> None:
    assert {p.name for p in NEGATIVE} == set(EXPECTED)
    assert len(REAL) == 15 and len(DERIVED) == 1


def test_the_bundled_root_is_aws_s() -> None:
    root = roots.aws_root()
    assert roots.fingerprint(root) == roots.AWS_ROOT_SHA256
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert roots.load_roots((DATA / "root.pem").read_bytes(), "root.pem") == [root]


def test_a_tampered_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roots, "AWS_ROOT_SHA256", "00" * 32)
    roots.aws_root.cache_clear()
    try:
        with pytest.raises(OperationFailed, match="not AWS's root"):
            roots.aws_root()
    finally:
        roots.aws_root.cache_clear()


@pytest.mark.parametrize("pem", [b"", b"junk", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_bad_root_pem_names_its_source(pem: bytes) -> None:
    with pytest.raises(InvalidInput) as e:
        roots.load_roots(pem, "my-roots.pem")
    assert e.value.diagnostics[0].file == "my-roots.pem"


@pytest.mark.parametrize("path", REAL + DERIVED, ids=lambda p: p.name)
def test_real_documents_verify_at_their_own_time(path: Path) -> None:
    report = verify(path.read_bytes(), roots=[roots.aws_root()], at="document")
    assert report.ok, report.failure
    assert report.document is not None and report.at == report.document.time
    assert [c.name for c in report.checks] == ["cbor", "envelope", "protected", "payload", "root", "chain",
                                               "validity", "signature", "debug"]
    assert report.debug == ("debug" in path.name)


@pytest.mark.parametrize("path", REAL + DERIVED, ids=lambda p: p.name)
def test_real_documents_are_refused_once_their_leaf_expired(path: Path) -> None:
    report = verify(path.read_bytes(), roots=[roots.aws_root()], at=LATER)
    assert not report.ok
    assert report.failure is not None and report.failure.name == "validity"
    assert report.failure.code == "E_CERT_TIME" and "certificate is valid" in report.failure.detail


def test_the_tag_is_reported() -> None:
    [tagged] = DERIVED
    assert decode(tagged.read_bytes()).tagged
    assert not decode((DATA / "oyster-verifier_2024-08-07.cbor").read_bytes()).tagged


@pytest.mark.parametrize("path", NEGATIVE, ids=lambda p: p.name)
def test_negatives_fail_for_their_documented_reason(path: Path) -> None:
    report = verify(path.read_bytes(), roots=[roots.aws_root()], at="document")
    assert not report.ok and report.failure is not None
    assert report.failure.code in EXPECTED[path.name], report.failure


@pytest.mark.parametrize("path", NEGATIVE, ids=lambda p: p.name)
def test_decode_agrees_on_syntactic_negatives(path: Path) -> None:
    code = verify(path.read_bytes(), roots=[roots.aws_root()], at="document").failure.code  # type: ignore[union-attr]
    if code in ("E_ROOT", "E_CHAIN", "E_CERT_TIME", "E_SIGNATURE"):
        decode(path.read_bytes())  # structurally fine: only the certificates or the signature are wrong
    else:
        with pytest.raises(AttestationError) as e:
            decode(path.read_bytes())
        assert e.value.code == code and e.value.check == e.value.diagnostics[0].field
