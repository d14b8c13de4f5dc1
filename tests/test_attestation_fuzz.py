"""Hostile bytes: decode raises only AttestationError and verify only returns a report, whatever the input."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import cbor2
from hypothesis import example, given
from hypothesis import strategies as st

from attestation_helpers import DATA, NOW, default_chain, sample_document, signed
from enclaver_rules.attestation import cose
from enclaver_rules.attestation.document import AttestationDocument, encode_payload, parse_payload
from enclaver_rules.attestation.errors import AttestationError
from enclaver_rules.attestation.roots import aws_root
from enclaver_rules.attestation.verify import decode, verify

REAL = (DATA / "oyster-verifier_2024-08-07.cbor").read_bytes()
INDEF = (DATA / "fluentbase_2026-03-06_indef.cbor").read_bytes()
SIMULATED = signed()


def _survives(data: bytes) -> None:
    try:
        decode(data)
    except AttestationError as e:
        assert e.code and e.check
    for roots, at in (([aws_root()], "document"), ([default_chain().root.certificate], NOW)):
        report = verify(data, roots=roots, at=at)  # type: ignore[arg-type]
        assert report.ok or report.failure is not None


@given(st.binary(max_size=2048))
@example(b"\xd2" * 100 + b"\x80")
@example(b"\x81" * 1000 + b"\x00")
@example(b"\x84\x44\xa1\x01\x38\x22\xa0\x5b" + b"\xff" * 8)  # a payload claiming 2^64 bytes
@example(b"\xc2\x59\xff\xff" + b"\x01" * 100)  # a bignum longer than its data
@example(cbor2.dumps([cbor2.dumps({1: -35}), {}, cbor2.dumps({"timestamp": cbor2.CBORTag(2, b"\x01" * 3000)}), bytes(96)]))
def test_arbitrary_bytes(data: bytes) -> None:
    _survives(data)


@given(st.sampled_from([REAL, INDEF, SIMULATED]), st.integers(min_value=0), st.integers(0, 255))
@example(INDEF, 2133, 1)  # the leaf's version byte: cryptography's InvalidVersion is no ValueError
def test_one_byte_changed(base: bytes, position: int, value: int) -> None:
    data = bytearray(base)
    data[position % len(data)] = value
    _survives(bytes(data))


@given(st.sampled_from([REAL, INDEF]), st.integers(min_value=0), st.integers(min_value=0), st.binary(max_size=16))
def test_spliced(base: bytes, start: int, length: int, insert: bytes) -> None:
    start %= len(base)
    _survives(base[:start] + insert + base[start + length % 64:])


@given(st.sampled_from(["certificate", 0, 1, 2, 3]), st.integers(min_value=0), st.integers(0, 255))
@example("certificate", 8, 1)
def test_hostile_certificates_re_signed(which: str | int, position: int, value: int) -> None:
    """Certificates changed inside a document that still decodes and is signed: the chain checks see them."""
    doc = sample_document()
    der = bytearray(doc.certificate if which == "certificate" else doc.cabundle[int(which)])
    der[position % len(der)] = value
    if which == "certificate":
        doc = replace(doc, certificate=bytes(der))
    else:
        doc = replace(doc, cabundle=tuple(bytes(der) if i == which else c for i, c in enumerate(doc.cabundle)))
    _survives(cose.sign1(encode_payload(doc), default_chain().leaf.key))


@given(st.builds(
    AttestationDocument,
    module_id=st.text(min_size=1, max_size=60), digest=st.just("SHA384"),
    timestamp=st.integers(1, 253_402_300_799_999),
    pcrs=st.dictionaries(st.integers(0, 31), st.sampled_from([32, 48, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
                         min_size=1, max_size=32),
    certificate=st.binary(min_size=1, max_size=1024),
    cabundle=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4).map(tuple),
    public_key=st.none() | st.binary(max_size=1024), user_data=st.none() | st.binary(max_size=64),
    nonce=st.none() | st.binary(max_size=64)), st.booleans())
def test_parse_of_encode_is_identity(doc: AttestationDocument, indefinite: bool) -> None:
    payload = encode_payload(doc, indefinite=indefinite)
    assert parse_payload(payload) == doc
    assert payload[0] == (0xBF if indefinite else 0xA9)
    assert datetime.fromtimestamp(0, UTC) < doc.time


def test_a_mutated_simulated_document_still_names_its_fields() -> None:
    assert parse_payload(encode_payload(sample_document())) == sample_document()
