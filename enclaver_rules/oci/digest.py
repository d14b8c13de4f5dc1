"""Content digests, and the error for bytes that do not match theirs.

Outside bytes (registry, engine, archive, another layout) are verified in one place:
`Store.put`, which hashes them as they stream to a temp file, caps them at the declared size and
keeps nothing on a mismatch. A mismatch names both digests, the byte count and the source.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

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

    @classmethod
    def of_file(cls, path: str | os.PathLike[str], algorithm: str = "sha256") -> Digest:
        """Streamed in 1 MiB chunks: files here are EIFs and layers, hundreds of MiB."""
        h = hashlib.new(algorithm)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return cls(algorithm, h.hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"


class DigestMismatch(OperationFailed):
    """Bytes did not match the digest (or size) that names them: refused, nothing kept."""
