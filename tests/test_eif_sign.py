"""EIF signature sections through the shared COSE code (`attestation.cose`) and the strict CBOR reader:
every algorithm round-trips, a changed bit fails verification, and CBOR tags in hostile bytes are refused."""

from __future__ import annotations

import datetime
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID

from enclaver_rules.attestation import cbor_strict, cose
from enclaver_rules.eif.format import EifError
from enclaver_rules.eif.measure import pcr_of
from enclaver_rules.eif.sign import MAX_SIGNATURE_SECTION, Signer, read_signature, signature_section

PCR0 = pcr_of(b"the image")
CURVES = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}


def _signer(curve: ec.EllipticCurve) -> Signer:
    key = ec.generate_private_key(curve)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signer")])
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return Signer(cert.public_bytes(serialization.Encoding.PEM), cert, key)


SIGNER = _signer(ec.SECP384R1())


def _parts(section: bytes) -> tuple[dict[str, Any], list[Any]]:
    """The section's entry and the COSE_Sign1 inside it, read by cbor2 (a trusted, locally made section)."""
    [entry] = cbor2.loads(section)
    return entry, cbor2.loads(bytes(entry["signature"]))


def _section(entry: dict[str, Any], envelope: list[Any]) -> bytes:
    return cbor2.dumps([{**entry, "signature": list(cbor2.dumps(envelope))}])


@pytest.mark.parametrize("name", CURVES)
def test_each_algorithm_round_trips_and_verifies(name: str) -> None:
    signer = _signer(CURVES[name])
    alg = cose.ALGORITHMS[{"ES256": -7, "ES384": -35, "ES512": -36}[name]]
    section = signature_section(signer, PCR0)
    info = read_signature(section)
    assert (info.algorithm, info.signed_pcr0, info.valid) == (name, PCR0, True)
    assert info.pcr8 == signer.pcr8
    entry, (protected, unprotected, payload, signature) = _parts(section)
    assert protected == alg.protected and unprotected == {} and len(signature) == alg.signature_size
    assert bytes(entry["signing_certificate"]) == signer.certificate_pem
    public = signer.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert cose.verify(protected, payload, signature, public, alg)


@pytest.mark.parametrize("part", [3, 2])  # the signature, the payload (PCR0)
@pytest.mark.parametrize("bit", [0, 7])
def test_a_flipped_bit_does_not_verify(part: int, bit: int) -> None:
    entry, envelope = _parts(signature_section(SIGNER, PCR0))
    changed = bytearray(envelope[part])
    changed[-1] ^= 1 << bit
    envelope[part] = bytes(changed)
    info = read_signature(_section(entry, envelope))
    assert info.valid is False and info.algorithm == "ES384"


def test_a_header_naming_another_algorithm_than_the_key_s_does_not_verify() -> None:
    """A P-256 certificate with an envelope that says ES384 and holds a P-256 signature over SHA-384,
    padded to ES384's width: the key's curve fixes the algorithm (as in aws-nitro-enclaves-cose), a
    header cannot switch it."""
    signer = _signer(ec.SECP256R1())
    entry, envelope = _parts(signature_section(signer, PCR0))
    protected, payload = cose.ES384.protected, envelope[2]
    r, s = decode_dss_signature(signer.key.sign(cose.sig_structure(protected, payload), ec.ECDSA(hashes.SHA384())))
    mixed = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    public = signer.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(encode_dss_signature(r, s), cose.sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
    info = read_signature(_section(entry, [protected, {}, payload, mixed]))
    assert info.algorithm == "ES384" and info.valid is False


TAGGED = {
    # a regular expression (cbor2 compiles it), a MIME message, a shared reference and its use
    "regex in the certificate": b"\x81\xa2\x73signing_certificate\xd8\x23\x63a.*\x69signature\x80",
    "MIME in the signature": b"\x81\xa2\x73signing_certificate\x80\x69signature\xd8\x24\x61x",
    "shared reference": b"\x81\xa2\x73signing_certificate\xd8\x1c\x81\xd8\x1d\x00\x69signature\x80",
    "tag around the section": b"\xd8\x12\x81\xa0",
}


@pytest.mark.parametrize("case", TAGGED)
def test_a_tag_in_the_section_is_refused_not_decoded(case: str) -> None:
    data = TAGGED[case]
    with pytest.raises(cbor_strict.TagNotAllowed):
        cbor_strict.decode(data, max_depth=8)
    with pytest.raises(EifError, match=r"is malformed: CBOR tag (35|36|28|18) "):
        read_signature(data)


@pytest.mark.parametrize("where", ["envelope", "protected", "payload"])
def test_a_tag_inside_the_cose_sign1_is_refused(where: str) -> None:
    entry, envelope = _parts(signature_section(SIGNER, PCR0))
    regex = cbor2.CBORTag(35, "^a")
    if where == "envelope":
        signed = cbor2.dumps(cbor2.CBORTag(18, envelope))  # nitro-cli writes it untagged; so must the EIF
    else:
        index = 0 if where == "protected" else 2
        envelope[index] = cbor2.dumps({1: -35, 2: regex} if where == "protected" else {"register_value": regex})
        signed = cbor2.dumps(envelope)
    with pytest.raises(EifError, match="is malformed: CBOR tag"):
        read_signature(cbor2.dumps([{**entry, "signature": list(signed)}]))


def test_a_repeated_key_is_malformed() -> None:
    """Two readers of the same bytes must not see different certificates."""
    pem = list(SIGNER.certificate_pem)
    data = (b"\x81\xa3" + cbor2.dumps("signing_certificate") + cbor2.dumps(pem) + cbor2.dumps("signature")
            + cbor2.dumps([]) + cbor2.dumps("signing_certificate") + cbor2.dumps([1]))
    with pytest.raises(EifError, match="appears twice"):
        read_signature(data)


def test_a_section_of_a_mebibyte_of_small_integers_is_read_quickly() -> None:
    """The largest section allowed, nearly all of it one serde byte vector: an array of ~10⁶ one-byte
    items, read through to the certificate (which is not PEM): decoded, not refused for its size."""
    entry, _ = _parts(signature_section(SIGNER, PCR0))
    tail = cbor2.dumps("signature") + cbor2.dumps(entry["signature"])
    head = b"\x81\xa2" + cbor2.dumps("signing_certificate") + b"\x9a"
    count = MAX_SIGNATURE_SECTION - len(head) - 4 - len(tail)
    data = head + count.to_bytes(4, "big") + b"\x07" * count + tail
    assert len(data) == MAX_SIGNATURE_SECTION
    with pytest.raises(EifError, match=r"malformed: .*PEM"):
        read_signature(data)
    with pytest.raises(EifError, match="more than 1,048,576"):
        read_signature(data + b"\x00")


def test_nesting_is_bounded() -> None:
    with pytest.raises(EifError, match="nested deeper than"):
        read_signature(b"\x81" * 4 + b"\x80")
