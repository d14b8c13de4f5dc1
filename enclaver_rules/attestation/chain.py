"""Issue an AWS-shaped certificate chain in memory, for simulated documents and tests.

The shape mirrors what AWS issues (reference §4.2): a self-signed root (CA, no pathLen), CAs below it
with decreasing pathLen (regional 2, zonal 1, instance 0), and a 3-hour leaf with CA:false,
digitalSignature and no key identifiers; every key P-384, every signature ecdsa-with-SHA384. Keys are
generated here and never written anywhere; the caller decides what to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ORGANIZATION = "enclaver"
UNIT = "simulated"  # says on every certificate that AWS did not issue it


@dataclass(frozen=True)
class Authority:
    """A certificate and the private key that signs with it."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, UNIT),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _usage(*, sign: bool, cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=crl_sign,
                         encipher_only=False, decipher_only=False)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, now: datetime,
             lifetime: timedelta) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + lifetime))


def new_root(common_name: str, now: datetime, lifetime: timedelta) -> Authority:
    """A self-signed root like AWS_NitroEnclaves_Root-G1: CA without pathLen, digitalSignature+keyCertSign+cRLSign."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(common_name)
    cert = (_builder(name, name, key, now, lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_usage(sign=True, cert_sign=True, crl_sign=True), critical=True)
            .sign(key, hashes.SHA384()))
    return Authority(cert, key)


def new_intermediate(issuer: Authority, common_name: str, now: datetime, lifetime: timedelta,
                     path_length: int) -> Authority:
    """A CA under `issuer` allowing `path_length` more CAs below it (AWS: regional 2, zonal 1, instance 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name(common_name), issuer.certificate.subject, key, now, lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_usage(sign=True, cert_sign=True, crl_sign=True), critical=True)
            .sign(issuer.key, hashes.SHA384()))
    return Authority(cert, key)


def new_leaf(issuer: Authority, common_name: str, now: datetime, lifetime: timedelta = timedelta(hours=3)) -> Authority:
    """The document-signing certificate: CA:false (critical), digitalSignature, no key identifiers (as AWS's)."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name(common_name), issuer.certificate.subject, key, now, lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(sign=True, cert_sign=False, crl_sign=False), critical=True)
            .sign(issuer.key, hashes.SHA384()))
    return Authority(cert, key)
