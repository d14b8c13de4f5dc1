"""COSE_Sign1 with ECDSA (RFC 8152 §4.2, §4.4, §8.1): enclaver's one implementation of it.

Two kinds of envelope use it. Attestation documents are ES384 only: built (`sign1`), decoded with
their shape and header checked (`decode_sign1`) and verified (`verify_signature`) here. EIF signature
sections hold an envelope whose algorithm follows the signing key's curve (ES256, ES384 or ES512);
`eif.sign` wraps and unwraps it and calls `sign1`, `header_alg` and `verify` for the COSE part.

The envelope is ``[protected, unprotected, payload, signature]``, untagged (what the NSM and nitro-cli
emit) or, for attestation documents, under tag 18; `protected` is the CBOR of ``{1: alg}``;
`signature` is ECDSA over the algorithm's hash of the Sig_structure ``["Signature1", protected, h'',
payload]``, as the raw ``r ‖ s``, each big-endian and as wide as the curve's order. The signed bytes
are the protected header and payload exactly as received, never a re-encoding.
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


@dataclass(frozen=True, slots=True)
class Algorithm:
    """An ECDSA algorithm of COSE: its name, its id (the protected header's label 1), its curve (as
    `cryptography` and NIST name it), its hash, and the bytes of r and of s in a signature."""

    name: str
    id: int
    curve: str
    curve_label: str
    digest: hashes.HashAlgorithm
    width: int

    @property
    def protected(self) -> bytes:
        """The protected header naming this algorithm and nothing else: the CBOR of ``{1: id}``."""
        return cbor2.dumps({1: self.id})

    @property
    def signature_size(self) -> int:
        return 2 * self.width


ES256 = Algorithm("ES256", -7, "secp256r1", "P-256", hashes.SHA256(), 32)
ES384 = Algorithm("ES384", -35, "secp384r1", "P-384", hashes.SHA384(), 48)
ES512 = Algorithm("ES512", -36, "secp521r1", "P-521", hashes.SHA512(), 66)  # ⌈521 / 8⌉
#: COSE id → algorithm
ALGORITHMS: dict[int, Algorithm] = {a.id: a for a in (ES256, ES384, ES512)}

ALG_ES384 = ES384.id
PROTECTED_ES384 = ES384.protected  # a1 01 38 22
TAG_SIGN1 = 18
COORDINATE = ES384.width  # bytes of r and of s on P-384
SIGNATURE_SIZE = ES384.signature_size
MAX_PAYLOAD = 16384
#: an envelope around the largest payload, with room for the tag and heads; anything larger is not a document
MAX_DOCUMENT = MAX_PAYLOAD + 256


def algorithm_for(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> Algorithm | None:
    """The algorithm a key on its curve signs with (ES256 on P-256, …), or None for another curve."""
    return next((a for a in ALGORITHMS.values() if a.curve == key.curve.name), None)


def header_alg(header: object) -> int | None:
    """The algorithm a decoded protected header names: the integer under the integer label 1 (not
    under `True`, which a Python map takes for 1), or None."""
    if not isinstance(header, Mapping):
        return None
    for label, value in header.items():
        if type(label) is int and label == 1:
            return value if type(value) is int else None
    return None


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The bytes a COSE_Sign1 signs: ``["Signature1", protected, h'' (external_aad), payload]``."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign(protected: bytes, payload: bytes, key: ec.EllipticCurvePrivateKey, alg: Algorithm) -> bytes:
    """The raw signature ``r ‖ s`` (each `alg.width` bytes) by `key` over `protected` and `payload`."""
    if key.curve.name != alg.curve:
        raise ValueError(f"{alg.name} needs a {alg.curve_label} key, not {key.curve.name}")
    r, s = decode_dss_signature(key.sign(sig_structure(protected, payload), ec.ECDSA(alg.digest)))
    return r.to_bytes(alg.width, "big") + s.to_bytes(alg.width, "big")


def verify(protected: bytes, payload: bytes, signature: bytes, key: ec.EllipticCurvePublicKey,
           alg: Algorithm) -> bool:
    """Whether `signature` (raw ``r ‖ s``) is `alg` by `key` over `protected` and `payload` as given.

    False, not an error, for a signature of the wrong length or a key on another curve than `alg`'s
    (as aws-nitro-enclaves-cose: the key's curve fixes the algorithm, a header naming another fails)."""
    if key.curve.name != alg.curve or len(signature) != alg.signature_size:
        return False
    r = int.from_bytes(signature[:alg.width], "big")
    s = int.from_bytes(signature[alg.width:], "big")
    try:
        key.verify(encode_dss_signature(r, s), sig_structure(protected, payload), ec.ECDSA(alg.digest))
    except (InvalidSignature, ValueError):
        return False
    return True


def sign1(payload: bytes, key: ec.EllipticCurvePrivateKey, alg: Algorithm = ES384) -> bytes:
    """An untagged COSE_Sign1 over `payload`, protected header ``{1: alg}``, empty unprotected map.

    With ES384 (the default) byte for byte what the NSM emits:
    ``84 44 a1013822 a0 59 <len> <payload> 58 60 <r ‖ s>``."""
    protected = alg.protected
    return cbor2.dumps([protected, {}, payload, sign(protected, payload, key, alg)])


@dataclass(frozen=True, slots=True)
class Sign1:
    """A decoded attestation envelope: the protected header and payload as received (the signed bytes)."""

    protected: bytes
    unprotected: Mapping[Any, Any]
    payload: bytes
    signature: bytes
    tagged: bool


def decode_sign1(data: bytes) -> Sign1:
    """The attestation envelope in `data`, checked for shape (codes E_SIZE … E_SIG_LEN) and for an ES384
    protected header (E_PROTECTED); the payload is not looked into."""
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
    if header_alg(header) != ES384.id:
        raise AttestationError("E_PROTECTED", "alg (label 1) must be -35 (ES384)")
    if len(header) != 1:
        raise AttestationError("E_PROTECTED", "protected header must hold only alg (label 1)")


def verify_signature(envelope: Sign1, key: ec.EllipticCurvePublicKey) -> bool:
    """Whether `envelope`'s signature is ES384 by `key` over its protected header and payload as received."""
    return verify(envelope.protected, envelope.payload, envelope.signature, key, ES384)
