"""EIF signatures and PCR8 (../shared/reference/eif.md §9).

The signature section is CBOR `[{"signing_certificate": <PEM bytes>, "signature": <COSE_Sign1>}]`
where both byte strings are encoded, as serde_cbor encodes a Vec<u8>, as arrays of unsigned
integers. The COSE_Sign1 is untagged, protected header `{1: alg}` (ES256/ES384/ES512 by the key's
curve), empty unprotected map, payload `{"register_index": 0, "register_value": PCR0 as uints}`,
signature r‖s. PCR8 = SHA384(0⁴⁸ ‖ SHA384(certificate DER)). ECDSA nonces are random, so signed
EIFs differ byte-wise between builds while PCR0 and PCR8 do not.

The COSE part (algorithms, Sig_structure, signing, verifying) is `attestation.cose`'s; the section's
hostile bytes are read by `attestation.cbor_strict`, which refuses every CBOR tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclaver_rules.attestation import cbor_strict, cose
from enclaver_rules.eif.format import SECTION_CMDLINE, SECTION_KERNEL, SECTION_RAMDISK, EifError, SectionSource
from enclaver_rules.eif.measure import Measurements, Measurer, pcr_of
from enclaver_rules.errors import InvalidInput


def _uints(data: bytes) -> list[int]:
    return list(data)


@dataclass(frozen=True)
class Signer:
    certificate_pem: bytes
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, certificate: str | Path, key: str | Path) -> Signer:
        try:
            pem = Path(certificate).read_bytes()
        except OSError as e:
            raise InvalidInput(f"cannot read the signing certificate: {e.strerror}", file=str(certificate),
                               field="signature.certificate", fix="give the PEM certificate's path") from None
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise InvalidInput("not a PEM certificate", file=str(certificate), field="signature.certificate",
                               fix="give a PEM (-----BEGIN CERTIFICATE-----) file") from None
        try:
            private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        except OSError as e:
            raise InvalidInput(f"cannot read the signing key: {e.strerror}", file=str(key), field="signature.key",
                               fix="give the PEM private key's path") from None
        except (ValueError, TypeError):
            raise InvalidInput("not an unencrypted PEM private key", file=str(key), field="signature.key",
                               fix="give an unencrypted EC private key in PEM") from None
        if not isinstance(private, ec.EllipticCurvePrivateKey) or cose.algorithm_for(private) is None:
            raise InvalidInput("the signing key must be an EC key on P-256, P-384 or P-521", file=str(key),
                               field="signature.key", fix="make one with `openssl ecparam -name secp384r1 -genkey`")
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or \
                public.public_numbers() != private.public_key().public_numbers():
            raise InvalidInput("the key does not belong to the certificate", file=str(key), field="signature.key",
                               fix="give the private key the certificate was issued for")
        return cls(pem, cert, private)

    @property
    def pcr8(self) -> str:
        return pcr_of(self.certificate.public_bytes(serialization.Encoding.DER))


def signature_section(signer: Signer, pcr0_hex: str) -> bytes:
    alg = cose.algorithm_for(signer.key)
    if alg is None:
        raise InvalidInput(f"the signing key is on {signer.key.curve.name}, not P-256, P-384 or P-521",
                           field="signature.key", fix="make one with `openssl ecparam -name secp384r1 -genkey`")
    payload = cbor2.dumps({"register_index": 0, "register_value": _uints(bytes.fromhex(pcr0_hex))})
    signed = cose.sign1(payload, signer.key, alg)
    return cbor2.dumps([{"signing_certificate": _uints(signer.certificate_pem), "signature": _uints(signed)}])


def measure_sections(sections: list[SectionSource]) -> Measurements:
    """PCRs of sections without writing them (a signature needs PCR0 before the EIF is written)."""
    with Measurer() as measurer:
        for section in sections:
            if section.kind == SECTION_RAMDISK:
                measurer.start_ramdisk()
            for chunk in section.chunks():
                if section.kind in (SECTION_KERNEL, SECTION_CMDLINE):
                    measurer.feed_boot(chunk)
                elif section.kind == SECTION_RAMDISK:
                    measurer.feed_ramdisk(chunk)
        return measurer.result()


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    certificate: x509.Certificate
    algorithm: str
    signed_pcr0: str
    valid: bool  # the COSE signature verifies with the certificate's key
    issuer: dict[str, str]  # what `nitro-cli describe-eif` shows of the certificate, read once here
    not_before: str
    not_after: str
    certificate_signature: str

    @property
    def pcr8(self) -> str:
        return pcr_of(self.certificate.public_bytes(serialization.Encoding.DER))


#: A signature section is a certificate and a COSE_Sign1 (a few KiB, twice that as CBOR uint arrays).
MAX_SIGNATURE_SECTION = 1 << 20
#: The deepest a real section nests (array → map → uint array); the COSE_Sign1 inside, its protected
#: header and its payload nest less. Deeper is not a section, and the bound keeps recursion small.
MAX_DEPTH = 3
#: What a hostile section can make the readers raise: `cbor_strict.CborError` (a ValueError) for bytes
#: that are not CBOR, hold a tag, a float, a repeated key or nest too deep, ValueError for wrong shapes
#: and certificates that are not PEM, UnsupportedAlgorithm for a certificate key cryptography does not
#: know, and the built-ins a certificate's accessors might raise.
_DECODE_ERRORS = (UnsupportedAlgorithm, ValueError, TypeError, LookupError)


def _cbor(data: bytes) -> Any:
    """The one CBOR item `data` holds, read strictly: no tag (regex, MIME, shared references), no float."""
    return cbor_strict.decode(data, max_depth=MAX_DEPTH)


def _byte_string(value: Any, what: str) -> bytes:
    """serde_cbor writes a Vec<u8> as an array of uints; a CBOR byte string is accepted too."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, list) and all(type(b) is int and 0 <= b <= 255 for b in value):
        return bytes(value)
    raise ValueError(f"{what} is not a byte string")


def _text(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else str(value)


def read_signature(section: bytes, where: str = "the signature section") -> SignatureInfo:
    """Decode a signature section and verify its COSE_Sign1 with the certificate it carries.

    A section that is not `[{signing_certificate, signature}]` with a PEM certificate and a
    COSE_Sign1 `[protected, unprotected, payload, signature]` is an `EifError` naming the part
    that is wrong; a well-formed signature that does not verify is `valid=False`, not an error."""
    if len(section) > MAX_SIGNATURE_SECTION:
        raise EifError(f"{where} is {len(section):,} bytes, more than {MAX_SIGNATURE_SECTION:,}",
                       fix="the EIF is corrupt or malicious")
    try:
        entries = _cbor(section)
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
            raise ValueError("not a list of one {signing_certificate, signature} map")
        entry = entries[0]
        pem = _byte_string(entry.get("signing_certificate"), "signing_certificate")
        envelope = _cbor(_byte_string(entry.get("signature"), "signature"))
        if not isinstance(envelope, list) or len(envelope) != 4:
            raise ValueError("the signature is not a COSE_Sign1 [protected, unprotected, payload, signature]")
        protected, payload, signature = (_byte_string(envelope[i], name) for i, name in
                                         ((0, "the protected header"), (2, "the payload"), (3, "the signature")))
        alg = cose.header_alg(_cbor(protected))
        if alg is None:
            raise ValueError("the protected header names no algorithm")
        claims = _cbor(payload)
        if not isinstance(claims, dict):
            raise ValueError("the payload is not a map")
        signed_pcr0 = _byte_string(claims.get("register_value"), "register_value").hex()
        certificate = x509.load_pem_x509_certificate(pem)
        public = certificate.public_key()
        issuer = {attr.oid._name: _text(attr.value) for attr in certificate.issuer}
        not_before, not_after = (certificate.not_valid_before_utc.isoformat(),
                                 certificate.not_valid_after_utc.isoformat())
        certificate_signature = ":".join(f"{b:02X}" for b in certificate.signature)
        certificate.public_bytes(serialization.Encoding.DER)  # PCR8 is taken from these
    except _DECODE_ERRORS as e:
        raise EifError(f"{where} is malformed: {str(e)[:200]}",
                       fix="the EIF is corrupt or malicious: rebuild or re-sign it") from None
    algorithm = cose.ALGORITHMS.get(alg)
    valid = (algorithm is not None and isinstance(public, ec.EllipticCurvePublicKey)
             and cose.verify(protected, payload, signature, public, algorithm))
    return SignatureInfo(certificate, algorithm.name if algorithm else str(alg), signed_pcr0, valid, issuer,
                         not_before, not_after, certificate_signature)
