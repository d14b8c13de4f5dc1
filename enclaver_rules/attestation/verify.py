"""Verify an attestation document: decode, then each check in AWS's order, as a `Report`.

Order (reference §5; tests/data/attestation/negative/EXPECTED.md): CBOR → envelope → protected header
→ payload syntax → root → chain → validity at the chosen instant → signature, then the policy the
caller asked for (expected PCRs, nonce, user_data, public_key) and the debug flag. The cryptographic
checks stop at the first failure (later ones would mean nothing); the policy checks all run, so one
report names every PCR that differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from enclaver_rules.attestation import _path, cose, pcrs
from enclaver_rules.attestation.document import AttestationDocument, iso, parse_payload
from enclaver_rules.attestation.errors import AttestationError

#: every check, in the order a report lists them
CHECKS = ("cbor", "envelope", "protected", "payload", "root", "chain", "validity", "signature",
          "debug", "pcrs", "nonce", "user-data", "public-key")


@dataclass(frozen=True, slots=True)
class Check:
    """One named check: passed or not, why, and (for a failure) its error code. `facts` holds
    machine-readable details, e.g. the PCRs that differ."""

    name: str
    ok: bool
    detail: str
    code: str = ""
    facts: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.code:
            out["code"] = self.code
        if self.facts:
            out.update(self.facts)
        return out


@dataclass(frozen=True, slots=True)
class Decoded:
    """A document that passed the structural and syntactic checks; the envelope's bytes as received."""

    envelope: cose.Sign1
    document: AttestationDocument

    @property
    def protected(self) -> bytes:
        return self.envelope.protected

    @property
    def payload(self) -> bytes:
        return self.envelope.payload

    @property
    def signature(self) -> bytes:
        return self.envelope.signature

    @property
    def tagged(self) -> bool:
        return self.envelope.tagged


@dataclass(frozen=True, slots=True)
class Report:
    """Every check run, in order. `document` is None when the bytes did not decode; `at` is the instant
    the certificates were checked at (None when never reached)."""

    checks: tuple[Check, ...]
    document: AttestationDocument | None = None
    at: datetime | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def debug(self) -> bool | None:
        return None if self.document is None else pcrs.is_debug(self.document.pcrs)

    def to_json(self) -> dict[str, Any]:
        failure = self.failure
        return {"ok": self.ok, "at": iso(self.at) if self.at else None, "debug": self.debug,
                "failure": failure.to_json() if failure else None,
                "document": self.document.to_json() if self.document else None,
                "checks": [c.to_json() for c in self.checks]}


def decode(data: bytes) -> Decoded:
    """Structural and syntactic checks only (no certificate, no signature); raises AttestationError."""
    envelope = cose.decode_sign1(bytes(data))
    return Decoded(envelope, parse_payload(envelope.payload))


def verify(data: bytes, *, roots: Sequence[x509.Certificate], at: datetime | Literal["document"],
           expect_pcrs: Mapping[int, bytes] | None = None, nonce: bytes | None = None,
           user_data: bytes | None = None, public_key: bytes | None = None, allow_debug: bool = True) -> Report:
    """The whole procedure. Never raises for a bad document: the report's first failed check says why.

    `at` is the instant the certificates must be valid at, an aware datetime, or "document" for the
    document's own timestamp (how a stored document is checked: its leaf lives 3 hours). With
    `expect_pcrs`, a debug-mode document fails the pcrs check whatever its values."""
    if not (isinstance(at, datetime) and at.utcoffset() is not None) and at != "document":
        raise ValueError(f"at must be a timezone-aware datetime or 'document', not {at!r}")
    checks: list[Check] = []
    try:
        decoded = decode(data)
    except AttestationError as e:
        return Report(tuple(_passed_before(e.check)) + (_failed(e),))
    doc = decoded.document
    checks += _passed_before("root")
    instant = doc.time if at == "document" else at
    try:
        root = _path.anchor(doc, roots)
        checks.append(Check("root", True, f"cabundle[0] is {root.subject.rfc4514_string()}"))
        path = _path.build(doc, root)
        checks.append(Check("chain", True, _path.check_chain(path)))
        checks.append(Check("validity", True, _path.check_validity(path, instant)))
        checks.append(_signature(decoded.envelope, path.leaf))
    except AttestationError as e:
        return Report(tuple(checks) + (_failed(e),), doc, instant)
    if not checks[-1].ok:
        return Report(tuple(checks), doc, instant)
    checks.append(_debug(doc, allow_debug))
    if expect_pcrs is not None:
        checks.append(_pcrs(doc, expect_pcrs))
    for name, code, want, got in (("nonce", "E_NONCE", nonce, doc.nonce),
                                  ("user-data", "E_USER_DATA", user_data, doc.user_data),
                                  ("public-key", "E_PUBLIC_KEY", public_key, doc.public_key)):
        if want is not None:
            checks.append(_equal(name, code, want, got))
    return Report(tuple(checks), doc, instant)


def _passed_before(name: str) -> list[Check]:
    """The decoding checks that ran and passed before `name` (they run in a fixed order)."""
    done = {"cbor": "one CBOR item", "envelope": "COSE_Sign1", "protected": "alg ES384", "payload": "fields valid"}
    return [Check(n, True, done[n]) for n in CHECKS[:CHECKS.index(name)] if n in done]


def _failed(e: AttestationError) -> Check:
    return Check(e.check, False, e.detail + (f" — {e.diagnostics[0].fix}" if e.diagnostics[0].fix else ""), e.code)


def _signature(envelope: cose.Sign1, leaf: x509.Certificate) -> Check:
    key = leaf.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and cose.verify_signature(envelope, key):
        return Check("signature", True, "ES384 by the leaf's key over the payload as received")
    return Check("signature", False, "COSE_Sign1 signature does not verify with the leaf certificate key",
                 "E_SIGNATURE")


def _debug(doc: AttestationDocument, allow: bool) -> Check:
    if not pcrs.is_debug(doc.pcrs):
        return Check("debug", True, "not a debug-mode enclave")
    text = "a debug-mode enclave (PCR0, PCR1 and PCR2 are zero): its measurements prove nothing about its code"
    return Check("debug", allow, text, "" if allow else "E_DEBUG")


def _pcrs(doc: AttestationDocument, expected: Mapping[int, bytes]) -> Check:
    differ = {str(i): {"expected": want.hex(), "got": got.hex() if got is not None else None}
              for i, want in sorted(expected.items()) if (got := doc.pcrs.get(i)) != want}
    problems = [f"PCR{i} expected {d['expected']} got {d['got'] or 'nothing (not in the document)'}"
                for i, d in differ.items()]
    if pcrs.is_debug(doc.pcrs):
        problems.insert(0, "a debug-mode enclave (PCR0, PCR1 and PCR2 are zero): any code could have produced it")
    names = ", ".join(f"PCR{i}" for i in sorted(expected))
    if problems:
        return Check("pcrs", False, "; ".join(problems), "E_PCR", {"differ": differ})
    return Check("pcrs", True, f"{names} as expected")


def _equal(name: str, code: str, want: bytes, got: bytes | None) -> Check:
    if got == want:
        return Check(name, True, f"{len(want)} bytes as expected")
    shown = "null" if got is None else _hex(got)
    return Check(name, False, f"{name} expected {_hex(want)} got {shown}", code,
                 {"expected": want.hex(), "got": None if got is None else got.hex()})


def _hex(value: bytes, limit: int = 64) -> str:
    return value.hex() if len(value) <= limit else value[:limit].hex() + f"… ({len(value)} bytes)"
