"""The shared COSE_Sign1 code (`attestation.cose`) on its own: the algorithm table, signing and verifying
raw ``r ‖ s`` for ES256, ES384 and ES512, and the protected header's algorithm."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from enclaver_rules.attestation import cose

KEYS = {alg.name: ec.generate_private_key(curve) for alg, curve in
        ((cose.ES256, ec.SECP256R1()), (cose.ES384, ec.SECP384R1()), (cose.ES512, ec.SECP521R1()))}


def test_the_table() -> None:
    assert {a.id: (a.name, a.curve, a.digest.name, a.width) for a in cose.ALGORITHMS.values()} == {
        -7: ("ES256", "secp256r1", "sha256", 32),
        -35: ("ES384", "secp384r1", "sha384", 48),
        -36: ("ES512", "secp521r1", "sha512", 66),
    }
    assert cose.ES384.protected == cose.PROTECTED_ES384 == bytes.fromhex("a1013822")
    assert cose.ES256.protected == bytes.fromhex("a10126") and cose.ES512.protected == bytes.fromhex("a1013823")
    assert cose.algorithm_for(ec.generate_private_key(ec.SECP224R1())) is None


@pytest.mark.parametrize("name", KEYS)
def test_sign_and_verify_raw_signatures(name: str) -> None:
    key = KEYS[name]
    alg = cose.algorithm_for(key)
    assert alg is not None and alg.name == name
    signature = cose.sign(alg.protected, b"payload", key, alg)
    assert len(signature) == alg.signature_size
    assert cose.verify(alg.protected, b"payload", signature, key.public_key(), alg)
    assert not cose.verify(alg.protected, b"payloae", signature, key.public_key(), alg)
    assert not cose.verify(alg.protected, b"payload", signature[:-1], key.public_key(), alg)
    flipped = bytes([signature[0] ^ 0x80]) + signature[1:]
    assert not cose.verify(alg.protected, b"payload", flipped, key.public_key(), alg)
    others = [k for n, k in KEYS.items() if n != name]
    assert not any(cose.verify(alg.protected, b"payload", signature, k.public_key(), alg) for k in others)


@pytest.mark.parametrize("name", KEYS)
def test_sign1_with_each_algorithm(name: str) -> None:
    key = KEYS[name]
    alg = cose.algorithm_for(key)
    assert alg is not None
    protected, unprotected, payload, signature = cbor2.loads(cose.sign1(b"\xa0", key, alg))
    assert (protected, unprotected, payload) == (alg.protected, {}, b"\xa0")
    assert cose.verify(protected, payload, signature, key.public_key(), alg)


def test_a_key_on_another_curve_cannot_sign() -> None:
    with pytest.raises(ValueError, match="ES512 needs a P-521 key, not secp384r1"):
        cose.sign(cose.ES512.protected, b"x", KEYS["ES384"], cose.ES512)
    with pytest.raises(ValueError, match="P-384"):
        cose.sign1(b"\xa0", KEYS["ES256"])  # the attestation default stays ES384


@pytest.mark.parametrize(("header", "alg"), [
    ({1: -35}, -35), ({1: -7, 4: b"kid"}, -7), ({4: b"kid", 1: -36}, -36),
    ({True: -35}, None), ({1: True}, None), ({1: "ES384"}, None), ({"1": -35}, None), ({}, None), ([1, -35], None),
    (None, None),
])
def test_header_alg(header: object, alg: int | None) -> None:
    assert cose.header_alg(header) == alg
