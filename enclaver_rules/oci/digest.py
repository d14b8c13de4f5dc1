"""Content digests, and the one reader that verifies outside bytes as they stream.

Every byte that crosses a trust boundary (registry, engine, archive, disk) is read through
`VerifyingReader`: hashed as it streams, capped at the declared size, and checked at EOF. A
mismatch names both digests, the byte count and where the bytes came from.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import BinaryIO

from enclaver_rules.errors import OperationFailed

_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_DIGEST = re.compile(r"^(sha256|sha384|sha512):([a-f0-9]+)$")


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        m = _DIGEST.match(text)
        if not m or len(m.group(2)) != _HEX_LENGTH[m.group(1)]:
            raise ValueError(f"{text!r} is not a digest (expected e.g. sha256:<64 lowercase hex digits>)")
        return cls(m.group(1), m.group(2))

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"


class DigestMismatch(OperationFailed):
    """Bytes did not match the digest (or size) that names them: refused, nothing kept."""


class VerifyingReader:
    """A file-like reader that hashes what passes and fails at EOF unless digest and size match.

    `expected_size` may be None when unknown (then only the digest is checked); reading more than
    `expected_size` bytes fails at once instead of buffering an endless stream.
    """

    def __init__(self, stream: BinaryIO, expected: Digest, expected_size: int | None, source: str) -> None:
        self._stream = stream
        self.expected = expected
        self.expected_size = expected_size
        self.source = source
        self._hash = expected.hasher()
        self.count = 0
        self._done = False

    def read(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        if self.expected_size is not None:
            left = self.expected_size - self.count
            n = left + 1 if n < 0 or n > left else n  # ask for one byte too many to notice overlong streams
        chunk = self._stream.read(n) if n >= 0 else self._stream.read()
        if chunk:
            self.count += len(chunk)
            self._hash.update(chunk)
            if self.expected_size is not None and self.count > self.expected_size:
                raise DigestMismatch(
                    f"{self.source}: more than the declared {self.expected_size} bytes for {self.expected}",
                    fix="the source serves different content than its manifest declares; do not use it")
            return chunk
        self._done = True
        self.check()
        return b""

    def check(self) -> None:
        got = Digest(self.expected.algorithm, self._hash.hexdigest())
        if self.expected_size is not None and self.count != self.expected_size:
            raise DigestMismatch(
                f"{self.source}: stream ended after {self.count} of {self.expected_size} bytes of {self.expected}",
                fix="the transfer was cut short; try again")
        if got != self.expected:
            raise DigestMismatch(
                f"{self.source}: content digest {got} does not match {self.expected} ({self.count} bytes read)",
                fix="the source holds tampered or corrupt data; nothing was kept")
