"""The local KMS's `CiphertextBlob`: its own versioned format (KMS's is opaque; kms-recipient notes §6.3).

    "ELKM" | version 1 | key-id length (1 byte) | key id (ASCII) | nonce (12) | AES-256-GCM ciphertext+tag

The key id travels in clear so Decrypt works without KeyId. The GCM associated data is the header
(magic, version, key id) followed by the encryption context as sorted, compact UTF-8 JSON: the
context is bound and its order never matters; a changed header, body or context fails the tag.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"ELKM"
VERSION = 1
NONCE = 12
TAG = 16


class InvalidCiphertext(ValueError):
    """Not a blob of this format, or one that fails its tag with this key and context."""


@dataclass(frozen=True, slots=True)
class Blob:
    key_id: str
    head: bytes
    nonce: bytes
    body: bytes


def canonical(context: Mapping[str, str] | None) -> bytes:
    """The encryption context as bound into a blob: sorted compact JSON, UTF-8."""
    return json.dumps(dict(context or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(key_id: str, material: bytes, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
    raw_id = key_id.encode("ascii")
    head = MAGIC + bytes([VERSION, len(raw_id)]) + raw_id
    nonce = os.urandom(NONCE)
    return head + nonce + AESGCM(material).encrypt(nonce, plaintext, head + canonical(context))


def parse(blob: bytes) -> Blob:
    """The parts of a blob (nothing checked cryptographically yet); InvalidCiphertext if it is not one."""
    if len(blob) < 6 or blob[:4] != MAGIC or blob[4] != VERSION or len(blob) < 6 + blob[5] + NONCE + TAG:
        raise InvalidCiphertext("the ciphertext was not made by this local KMS")
    end = 6 + blob[5]
    try:
        key_id = blob[6:end].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidCiphertext("the ciphertext was not made by this local KMS") from None
    return Blob(key_id, blob[:end], blob[end:end + NONCE], blob[end + NONCE:])


def unseal(blob: Blob, material: bytes, context: Mapping[str, str] | None) -> bytes:
    try:
        return AESGCM(material).decrypt(blob.nonce, blob.body, blob.head + canonical(context))
    except InvalidTag:
        raise InvalidCiphertext("the ciphertext was altered, or the encryption context differs from the one it "
                                "was encrypted with") from None
