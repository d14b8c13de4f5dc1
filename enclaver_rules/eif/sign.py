"""EIF signatures and PCR8 (../shared/reference/eif.md §9).

The signature section is CBOR `[{"signing_certificate": <PEM bytes>, "signature": <COSE_Sign1>}]`
where both byte strings are encoded, as serde_cbor encodes a Vec<u8>, as arrays of unsigned
integers. The COSE_Sign1 is untagged, protected header `{1: alg}` (ES256/ES384/ES512 by the key's
curve), empty unprotected map, payload `{"register_index": 0, "register_value": PCR0 as uints}`,
signature r‖s. PCR8 = SHA384(0⁴⁸ ‖ SHA384(certificate DER)). ECDSA nonces are random, so signed
EIFs differ byte-wise between builds while PCR0 and PCR8 do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from enclaver_rules.eif.format import SECTION_CMDLINE, SECTION_KERNEL, SECTION_RAMDISK, SectionSource
from enclaver_rules.eif.measure import Measurements, Measurer, pcr_of
from enclaver_rules.errors import InvalidInput

#: curve → (COSE alg id, hash, bytes per coordinate)
ALGORITHMS: dict[str, tuple[int, Any, int]] = {
    "secp256r1": (-7, hashes.SHA256, 32),
    "secp384r1": (-35, hashes.SHA384, 48),
    "secp521r1": (-36, hashes.SHA512, 66),
}
ALG_NAMES = {-7: "ES256", -35: "ES384", -36: "ES512"}


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
        if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name not in ALGORITHMS:
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


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def signature_section(signer: Signer, pcr0_hex: str) -> bytes:
    alg, digest, width = ALGORITHMS[signer.key.curve.name]
    protected = cbor2.dumps({1: alg})
    payload = cbor2.dumps({"register_index": 0, "register_value": _uints(bytes.fromhex(pcr0_hex))})
    der = signer.key.sign(_sig_structure(protected, payload), ec.ECDSA(digest()))
    r, s = decode_dss_signature(der)
    cose = cbor2.dumps([protected, {}, payload, r.to_bytes(width, "big") + s.to_bytes(width, "big")])
    return cbor2.dumps([{"signing_certificate": _uints(signer.certificate_pem), "signature": _uints(cose)}])


def measure_sections(sections: list[SectionSource]) -> Measurements:
    """PCRs of sections without writing them (a signature needs PCR0 before the EIF is written)."""
    measurer = Measurer()
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

    @property
    def pcr8(self) -> str:
        return pcr_of(self.certificate.public_bytes(serialization.Encoding.DER))


def read_signature(section: bytes) -> SignatureInfo:
    """Decode a signature section and verify its COSE_Sign1 with the certificate it carries."""
    try:
        [entry] = cbor2.loads(section)
        pem = bytes(entry["signing_certificate"])
        cose = bytes(entry["signature"])
        protected, _unprotected, payload, signature = cbor2.loads(cose)
        alg = cbor2.loads(protected)[1]
        claims = cbor2.loads(payload)
        signed_pcr0 = bytes(claims["register_value"]).hex()
        certificate = x509.load_pem_x509_certificate(pem)
    except (ValueError, KeyError, TypeError, cbor2.CBORDecodeError) as e:
        raise InvalidInput(f"malformed signature section: {e}", fix="the EIF is corrupt") from None
    public = certificate.public_key()
    entry_alg = next(((a, h, w) for a, h, w in ALGORITHMS.values() if a == alg), None)
    valid = False
    if entry_alg is not None and isinstance(public, ec.EllipticCurvePublicKey) and len(signature) == 2 * entry_alg[2]:
        width = entry_alg[2]
        der = encode_dss_signature(int.from_bytes(signature[:width], "big"), int.from_bytes(signature[width:], "big"))
        try:
            public.verify(der, _sig_structure(protected, payload), ec.ECDSA(entry_alg[1]()))
            valid = True
        except InvalidSignature:
            valid = False
    return SignatureInfo(certificate, ALG_NAMES.get(alg, str(alg)), signed_pcr0, valid)
