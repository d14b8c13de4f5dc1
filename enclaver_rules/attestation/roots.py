"""Trusted roots: the bundled AWS Nitro Enclaves Root-G1, pinned by fingerprint, and roots given as PEM.

The one place this package reads a file: the PEM shipped inside it (package data). Its SHA-256 over
the DER must be AWS's published fingerprint, so an edited or swapped file is refused, not trusted.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclaver_rules.errors import InvalidInput, OperationFailed

AWS_ROOT_FILE = "aws_root_g1.pem"
#: AWS's published SHA-256 fingerprint of AWS_NitroEnclaves_Root-G1 (page "Verifying the root of trust")
AWS_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
MAX_PEM = 1 << 20


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, lowercase hex (what AWS publishes, without the colons)."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@cache
def aws_root() -> x509.Certificate:
    """The bundled AWS Nitro Enclaves Root-G1, after checking its fingerprint."""
    pem = resources.files(__package__).joinpath(AWS_ROOT_FILE).read_bytes()
    certs = load_roots(pem, f"the bundled {AWS_ROOT_FILE}")
    if len(certs) != 1 or fingerprint(certs[0]) != AWS_ROOT_SHA256:
        got = ", ".join(fingerprint(c) for c in certs)
        raise OperationFailed(f"the bundled {AWS_ROOT_FILE} is not AWS's root (SHA-256 {got}, expected "
                              f"{AWS_ROOT_SHA256})", fix="reinstall enclaver: its files were modified")
    return certs[0]


def load_roots(pem: bytes, source: str) -> list[x509.Certificate]:
    """Every certificate in `pem` (one or several PEM blocks); InvalidInput naming `source` when there
    is none or one is not a certificate."""
    if len(pem) > MAX_PEM:
        raise InvalidInput(f"{len(pem)} bytes is too large for a PEM file of root certificates", file=source)
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise InvalidInput(f"not PEM certificates ({e})", file=source,
                           fix="pass a PEM file of -----BEGIN CERTIFICATE----- blocks") from None
    if not certs:
        raise InvalidInput("no certificate in it", file=source, fix="pass a PEM file of certificates")
    return certs
