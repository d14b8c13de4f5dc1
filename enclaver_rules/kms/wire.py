"""AWS JSON 1.1 as KMS speaks it: the target header, the content type, the error body. Standard library only.

From botocore's KMS model (`botocore/data/kms/2014-11-01/service-2.json`: `protocol json`,
`jsonVersion 1.1`, `targetPrefix TrentService`) and `botocore/serialize.py` (target = prefix + "." +
operation, content type `application/x-amz-json-<jsonVersion>`); errors are `{"__type", "message"}`,
which `botocore/parsers.py` reads (kms-recipient notes §1.3).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

TARGET_PREFIX = "TrentService."
CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_HEADER = "X-Amz-Target"
#: the only `RecipientInfo.KeyEncryptionAlgorithm` the model allows (`KeyEncryptionMechanism`)
KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
RECIPIENT = "Recipient"
CIPHERTEXT_FOR_RECIPIENT = "CiphertextForRecipient"
#: Every action whose input has a `Recipient` member (botocore model, 1.44), and the answer field
#: that carries the plaintext when there is no Recipient (null or empty when there is one).
RECIPIENT_ACTIONS: Mapping[str, str] = MappingProxyType({
    "Decrypt": "Plaintext",
    "GenerateDataKey": "Plaintext",
    "GenerateDataKeyPair": "PrivateKeyPlaintext",
    "GenerateRandom": "Plaintext",
    "DeriveSharedSecret": "SharedSecret",
})
_ACTION = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")


def action_of(target_header: str) -> str:
    """`TrentService.Decrypt` → `Decrypt`; ValueError for anything else (another service's prefix,
    no action, characters no KMS operation name has)."""
    if not isinstance(target_header, str) or not target_header.startswith(TARGET_PREFIX):
        raise ValueError(f"{TARGET_HEADER} {target_header!r:.80} does not start with {TARGET_PREFIX!r}")
    action = target_header[len(TARGET_PREFIX):]
    if not _ACTION.fullmatch(action):
        raise ValueError(f"{TARGET_HEADER} {target_header!r:.80} names no action")
    return action


def target_of(action: str) -> str:
    """`Decrypt` → `TrentService.Decrypt`."""
    return TARGET_PREFIX + action


class ServiceError(Exception):
    """An error answer: its `__type` code, message and HTTP status (400 unless the model says otherwise)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status

    def body(self) -> bytes:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> bytes:
    """The JSON error body: `{"__type": code, "message": message}`."""
    return json.dumps({"__type": code, "message": message}, separators=(",", ":")).encode()


def loads(data: str | bytes) -> Any:
    """JSON read strictly, by both the KMS proxy and the local KMS: a key given twice (two readers
    must never see different values: a second `Condition` would replace the first), NaN, Infinity,
    a number out of range or nesting too deep is a ValueError."""
    try:
        return json.loads(data, object_pairs_hook=_unique, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"the key {key[:60]!r} is given twice")
        document[key] = value
    return document


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
