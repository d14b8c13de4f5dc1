"""Test helpers for the attestation tests: the vectors, a test chain, documents signed with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclaver_rules.attestation import chain, cose, pcrs
from enclaver_rules.attestation.document import AttestationDocument, encode_payload

DATA = Path(__file__).resolve().parent / "data" / "attestation"
REAL = sorted(DATA.glob("*.cbor"))
DERIVED = sorted((DATA / "derived").glob("*.cbor"))
NEGATIVE = sorted((DATA / "negative").glob("*.cbor"))
NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
INSTANCE = "i-0123456789abcdef0"
MODULE_ID = f"{INSTANCE}-enc0123456789abcdef"


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


@dataclass(frozen=True)
class SimChain:
    root: chain.Authority
    cas: tuple[chain.Authority, ...]  # regional, zonal, instance
    leaf: chain.Authority

    @property
    def cabundle(self) -> tuple[bytes, ...]:
        return (der(self.root.certificate), *(der(a.certificate) for a in self.cas))


def build_chain(now: datetime = NOW, *, leaf: Callable[[chain.Authority], chain.Authority] | None = None,
                path_lengths: tuple[int, ...] = (2, 1, 0)) -> SimChain:
    root = chain.new_root("test.nitro-enclaves", now - timedelta(days=365), timedelta(days=3650))
    cas: list[chain.Authority] = []
    issuer = root
    for i, n in enumerate(path_lengths):
        issuer = chain.new_intermediate(issuer, f"ca{i}.test", now - timedelta(days=1), timedelta(days=10), n)
        cas.append(issuer)
    made = leaf(issuer) if leaf else chain.new_leaf(issuer, f"{MODULE_ID}.test", now - timedelta(minutes=5))
    return SimChain(root, tuple(cas), made)


@cache
def default_chain() -> SimChain:
    return build_chain()


def sample_document(test_chain: SimChain | None = None, **changes: Any) -> AttestationDocument:
    c = test_chain or default_chain()
    values = {i: bytes([i + 1]) * 48 for i in range(16)}
    values[4] = pcrs.of_string(INSTANCE)
    doc = AttestationDocument(module_id=MODULE_ID, digest="SHA384", timestamp=int(NOW.timestamp() * 1000),
                              pcrs=values, certificate=der(c.leaf.certificate), cabundle=c.cabundle,
                              public_key=None, user_data=b"hello", nonce=bytes(20))
    return replace(doc, **changes)


def signed(doc: AttestationDocument | None = None, *, test_chain: SimChain | None = None,
           indefinite: bool = True) -> bytes:
    c = test_chain or default_chain()
    return cose.sign1(encode_payload(doc or sample_document(c), indefinite=indefinite), c.leaf.key)
