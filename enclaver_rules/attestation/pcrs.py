"""PCR arithmetic (SHA-384 registers) and the measurements files the rule set writes.

A PCR starts as 48 zero bytes and only ever moves by `extend`: ``new = SHA-384(old ‖ data)``. PCR3
and PCR4 are one extend from zero over the parent's IAM role ARN and instance id (checked against
PCR4 of every real document in tests/data/attestation/).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from enclaver_rules.errors import InvalidInput

SIZE = 48
ZERO = bytes(SIZE)
COUNT = 32
#: the registers whose all-zero value marks a debug-mode enclave (AWS zeroes them; PCR4 keeps its value)
DEBUG_ZEROED = (0, 1, 2)
HEX_LENGTHS = (64, 96, 128)  # 32, 48 or 64 bytes: what a document may carry


def extend(old: bytes, data: bytes) -> bytes:
    """The register after ExtendPCR(data): SHA-384(old ‖ data)."""
    return hashlib.sha384(old + data).digest()


def of_string(value: str) -> bytes:
    """PCR3 / PCR4 as AWS computes them: one extend from zero over the UTF-8 text (role ARN, instance id)."""
    return extend(ZERO, value.encode())


def is_debug(pcrs: Mapping[int, bytes]) -> bool:
    """A debug-mode enclave: PCR0, PCR1 and PCR2 are all zero (its document proves nothing about its code)."""
    return all(i in pcrs and not any(pcrs[i]) for i in DEBUG_ZEROED)


def parse_hex(value: Any, where: str, field: str) -> bytes:
    """One PCR value given as hex (64, 96 or 128 digits); InvalidInput naming `where` and `field` otherwise."""
    if not isinstance(value, str) or len(value) not in HEX_LENGTHS:
        shown = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise InvalidInput(f"a PCR is 64, 96 or 128 hex digits (32/48/64 bytes), got {shown}", file=where,
                           field=field, fix="copy the value from measurements.json or `enclaver trust`")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise InvalidInput("not hexadecimal", file=where, field=field,
                           fix="a PCR is written as hex digits 0-9 a-f") from None


def parse_measurements(data: Mapping[str, Any], where: str = "measurements") -> dict[int, bytes]:
    """``{"Measurements": {"PCR0": hex, …}}`` (nitro-cli's and the rule set's file) or a flat
    ``{"PCR0": hex, …}`` → index → bytes. "HashAlgorithm" and other non-PCR keys are ignored."""
    if not isinstance(data, Mapping):
        raise InvalidInput(f"expected a JSON object, got {type(data).__name__}", file=where,
                           fix='pass a measurements.json: {"Measurements": {"PCR0": "…", …}}')
    inner = data.get("Measurements", data)
    prefix = "Measurements." if "Measurements" in data else ""
    if not isinstance(inner, Mapping):
        raise InvalidInput(f"expected an object, got {type(inner).__name__}", file=where, field="Measurements")
    out: dict[int, bytes] = {}
    for key, value in inner.items():
        if not isinstance(key, str) or not key.upper().startswith("PCR"):
            continue
        digits = key[3:]
        if not digits.isdecimal() or len(digits) > 2 or not 0 <= int(digits) < COUNT:
            raise InvalidInput(f"{key} is not a PCR name (PCR0 … PCR31)", file=where, field=prefix + key)
        out[int(digits)] = parse_hex(value, where, prefix + key)
    if not out:
        raise InvalidInput("no PCR in it", file=where, fix='expected keys like "PCR0", "PCR1", "PCR2"')
    return out
