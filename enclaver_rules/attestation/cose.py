"""COSE_Sign1 with ES384 (RFC 8152 §4.2, §4.4), as AWS Nitro Enclaves use it: build, decode, verify.

The envelope is ``[protected, unprotected, payload, signature]``, untagged (what the NSM emits) or
under tag 18; `protected` is the CBOR of ``{1: -35}``; `signature` is ECDSA P-384 over SHA-384 of the
Sig_structure ``["Signature1", protected, h'', payload]``, as the raw 96 bytes ``r ‖ s``. The signed
bytes are the protected header and payload exactly as received, never a re-encoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from enclaver_rules.attestation._cbor import decode_exact
from enclaver_rules.attestation.cbor_strict import Tagged
from enclaver_rules.attestation.errors import AttestationError

ALG_ES384 = -35
PROTECTED_ES384 = cbor2.dumps({1: ALG_ES384})  # a1 01 38 22
TAG_SIGN1 = 18
COORDINATE = 48  # bytes of r and of s on P-384
SIGNATURE_SIZE = 2 * COORDINATE
MAX_PAYLOAD = 16384
#: an envelope around the largest payload, with room for the tag and heads; anything larger is not a document
MAX_DOCUMENT = MAX_PAYLOAD + 256


@dataclass(frozen=True, slots=True)
class Sign1:
    """A decoded envelope: the protected header and payload as received (the signed bytes)."""

    protected: bytes
    unprotected: Mapping[Any, Any]
    payload: bytes
    signature: bytes
    tagged: bool


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The bytes ES384 signs: ``["Signature1", protected, h'' (external_aad), payload]``."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign1(payload: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """An untagged COSE_Sign1 over `payload`, byte for byte what the NSM emits:
    ``84 44 a1013822 a0 59 <len> <payload> 58 60 <r ‖ s>``."""
    if not isinstance(key.curve, ec.SECP384R1):
        raise ValueError(f"ES384 needs a P-384 key, not {key.curve.name}")
    der = key.sign(sig_structure(PROTECTED_ES384, payload), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(COORDINATE, "big") + s.to_bytes(COORDINATE, "big")
    return cbor2.dumps([PROTECTED_ES384, {}, payload, signature])


def decode_sign1(data: bytes) -> Sign1:
    """The envelope in `data`, checked for shape (codes E_SIZE … E_SIG_LEN); the payload is not looked into."""
    if len(data) > MAX_DOCUMENT:
        raise AttestationError("E_SIZE", f"{len(data)} bytes: an attestation document is at most {MAX_DOCUMENT}",
                               fix="pass the COSE_Sign1 document the NSM returned, nothing else")
    # tag 18 around the whole envelope, and no other tag anywhere (E_TAG)
    item = decode_exact(data, what="COSE_Sign1", code="E_CBOR", tags=(TAG_SIGN1,), tag_code="E_TAG")
    tagged = isinstance(item, Tagged)
    if isinstance(item, Tagged):
        item = item.value
    if not isinstance(item, (list, tuple)) or len(item) != 4:
        got = f"{type(item).__name__}[{len(item)}]" if isinstance(item, (list, tuple)) else type(item).__name__
        raise AttestationError("E_COSE_STRUCT", f"COSE_Sign1 must be a 4-element array, got {got}")
    protected, unprotected, payload, signature = item
    for name, value in (("protected", protected), ("payload", payload), ("signature", signature)):
        if type(value) is not bytes:
            raise AttestationError("E_COSE_STRUCT", f"{name} must be bytes, got {type(value).__name__}")
    if not isinstance(unprotected, Mapping):
        raise AttestationError("E_COSE_STRUCT", f"unprotected header must be a map, got {type(unprotected).__name__}")
    if len(signature) != SIGNATURE_SIZE:
        raise AttestationError("E_SIG_LEN", f"signature is {len(signature)} bytes, ES384 needs {SIGNATURE_SIZE}")
    if not 1 <= len(payload) <= MAX_PAYLOAD:
        raise AttestationError("E_COSE_STRUCT", f"payload is {len(payload)} bytes, must be 1..{MAX_PAYLOAD}")
    _check_protected(protected)
    return Sign1(protected, unprotected, payload, signature, tagged)


def _check_protected(protected: bytes) -> None:
    if not protected:
        raise AttestationError("E_PROTECTED", "protected header is not CBOR (empty)")
    try:
        header = decode_exact(protected, what="protected header", code="E_PROTECTED")
    except AttestationError as e:  # a repeated label is a malformed header like any other
        raise AttestationError("E_PROTECTED", e.detail) from None
    if not isinstance(header, Mapping):
        raise AttestationError("E_PROTECTED", f"protected header must be a map, got {type(header).__name__}")
    alg = header.get(1)
    if type(alg) is not int or alg != ALG_ES384 or not any(type(k) is int and k == 1 for k in header):
        raise AttestationError("E_PROTECTED", "alg (label 1) must be -35 (ES384)")
    if len(header) != 1:
        raise AttestationError("E_PROTECTED", "protected header must hold only alg (label 1)")


def verify_signature(envelope: Sign1, key: ec.EllipticCurvePublicKey) -> bool:
    """Whether `envelope`'s signature is ES384 by `key` over its protected header and payload as received."""
    r = int.from_bytes(envelope.signature[:COORDINATE], "big")
    s = int.from_bytes(envelope.signature[COORDINATE:], "big")
    try:
        key.verify(encode_dss_signature(r, s), sig_structure(envelope.protected, envelope.payload),
                   ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True
