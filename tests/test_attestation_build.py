"""Issuing documents: encode_payload + sign1 produce the NSM's exact bytes, and decode reads them back."""

from __future__ import annotations

import cbor2
import pytest

from attestation_helpers import REAL, default_chain, sample_document, signed
from enclaver_rules.attestation import cose, pcrs
from enclaver_rules.attestation.document import FIELDS, encode_payload, parse_payload
from enclaver_rules.attestation.errors import AttestationError


def test_round_trip() -> None:
    doc = sample_document()
    envelope = cose.decode_sign1(signed(doc))
    assert parse_payload(envelope.payload) == doc
    assert cose.verify_signature(envelope, default_chain().leaf.certificate.public_key())
    assert not envelope.tagged


@pytest.mark.parametrize("indefinite", [True, False])
def test_wire_layout_is_the_nsm_s(indefinite: bool) -> None:
    data = signed(indefinite=indefinite)
    assert data[:8] == bytes.fromhex("8444a1013822a059")
    assert data[-98:-96] == b"\x58\x60"
    payload = cose.decode_sign1(data).payload
    assert payload[0] == (0xBF if indefinite else 0xA9)
    assert (payload[-1] == 0xFF) is indefinite
    pairs = payload[1:]
    positions = [pairs.index(cbor2.dumps(name)) for name in FIELDS]
    assert positions == sorted(positions), "keys in the NSM's order"
    assert cbor2.dumps("timestamp") + b"\x1b" in payload
    assert payload.count(b"\x58\x30") >= 16  # every PCR value is a 48-byte bstr
    assert b"\xf6" in payload  # public_key is null, not omitted


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_payloads_re_encode_byte_for_byte(path) -> None:
    envelope = cose.decode_sign1(path.read_bytes())
    doc = parse_payload(envelope.payload)
    assert encode_payload(doc, indefinite=envelope.payload[0] == 0xBF) == envelope.payload


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_pcr4_measures_the_instance_id(path) -> None:
    doc = parse_payload(cose.decode_sign1(path.read_bytes()).payload)
    assert doc.instance_id and doc.pcrs[4] == pcrs.of_string(doc.instance_id)


def test_encode_refuses_what_decode_refuses() -> None:
    with pytest.raises(AttestationError) as e:
        encode_payload(sample_document(user_data=bytes(1025)))
    assert e.value.code == "E_FIELD_VALUE" and "user_data" in str(e.value)
    with pytest.raises(AttestationError) as e:
        encode_payload(sample_document(pcrs={40: bytes(48)}))
    assert e.value.code == "E_FIELD_VALUE"


def test_sign1_needs_p384() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(ValueError, match="P-384"):
        cose.sign1(b"\xa0", ec.generate_private_key(ec.SECP256R1()))
