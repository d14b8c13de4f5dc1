"""A request's `Recipient`: the attestation document verified, and the secret sealed for its key.

The document goes through the one verifier (`enclaver_rules.attestation.verify`: CBOR, COSE_Sign1
signature, chain to a trusted root, every certificate valid at the request's time); a debug-mode
document verifies (its all-zero PCRs then fail any policy that names real ones). It must carry a
`public_key` that is an RSA SubjectPublicKeyInfo of 2048..8192 bits (`cms.load_recipient_key`). A
document that fails any of this is a ValidationException: which code real KMS answers is
UNCONFIRMED (kms-recipient notes §7.4), and nothing is released either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from enclaver_rules.attestation.verify import verify
from enclaver_rules.kms import cms
from enclaver_rules.kms.wire import CIPHERTEXT_FOR_RECIPIENT, KEY_ENCRYPTION_ALGORITHM, RECIPIENT_ACTIONS, ServiceError


@dataclass(frozen=True, slots=True)
class Attested:
    """What a verified document gives the request: its PCRs (the policy's condition keys) and the
    enclave's public key (DER SPKI) to seal the answer for."""

    pcrs: Mapping[int, bytes]
    public_key: bytes


def attested(recipient: Mapping[str, Any] | None, roots: Sequence[x509.Certificate], now: datetime) -> Attested | None:
    """None without a Recipient; the verified document's facts; ServiceError for anything else."""
    if recipient is None:
        return None
    algorithm = recipient.get("KeyEncryptionAlgorithm")
    document = recipient.get("AttestationDocument")
    if algorithm != KEY_ENCRYPTION_ALGORITHM:
        raise ServiceError("ValidationException", f"Recipient.KeyEncryptionAlgorithm must be "
                                                  f"{KEY_ENCRYPTION_ALGORITHM}, not {algorithm!r}")
    if document is None:
        raise ServiceError("ValidationException", "Recipient.AttestationDocument is required with a Recipient")
    report = verify(document, roots=roots, at=now)
    failure = report.failure
    if failure is not None or report.document is None:
        detail = f"{failure.name}: {failure.detail}" if failure else "not decoded"
        raise ServiceError("ValidationException", f"Recipient.AttestationDocument is not a valid attestation "
                                                  f"document from a trusted root ({detail})")
    public_key = report.document.public_key
    if not public_key:
        raise ServiceError("ValidationException", "Recipient.AttestationDocument carries no public_key: the "
                                                  "enclave must put its RSA public key (DER SPKI) in it")
    try:
        cms.load_recipient_key(public_key)
    except cms.CmsError as e:
        raise ServiceError("ValidationException", f"Recipient.AttestationDocument public_key: {e}") from None
    return Attested(dict(report.document.pcrs), public_key)


def answer(action: str, result: dict[str, Any], secret: bytes, attested: Attested | None) -> dict[str, Any]:
    """`result` with `secret` in the action's plaintext member (`wire.RECIPIENT_ACTIONS`) or, for an
    attested request, only as CiphertextForRecipient (the plaintext member left out: the model says
    "null or empty")."""
    if attested is None:
        result[RECIPIENT_ACTIONS[action]] = secret
    else:
        result[CIPHERTEXT_FOR_RECIPIENT] = cms.build_enveloped(secret, attested.public_key)
    return result
