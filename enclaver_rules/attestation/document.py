"""The attestation document (the COSE payload): model, exact wire encoding, syntactic checks.

The rules are AWS's (aws-nitro-enclaves-nsm-api docs/attestation_process.md §2.2 and §3.2.2), with
two corrections seen on real documents: the optional fields may be null and may be empty, and all
three are bounded to 0..1024 bytes (AWS's own hardware test sends 1024). The same checks run on
what is decoded (`parse_payload`) and on what is issued (`encode_payload`), so a simulator cannot
produce a document the verifier would refuse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import cbor2

from enclaver_rules.attestation._cbor import decode_exact
from enclaver_rules.attestation.errors import AttestationError

#: the nine keys, in the order the NSM writes them (the Rust struct's declaration order)
FIELDS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce")
MANDATORY = FIELDS[:6]
OPTIONAL = FIELDS[6:]
DIGEST = "SHA384"
PCR_SIZES = (32, 48, 64)
MAX_PCRS = 32
MAX_CERT = 1024
MAX_OPTIONAL = 1024
#: 9999-12-31T23:59:59.999Z: a later timestamp fits the uint64 but no calendar (and no validity check)
MAX_TIMESTAMP_MS = 253_402_300_799_999
_INSTANCE = re.compile(r"^(i-[0-9a-f]+)-enc[0-9a-f]+$")


@dataclass(frozen=True, slots=True)
class AttestationDocument:
    """One attestation document. `timestamp` is milliseconds since the Unix epoch (UTC);
    `pcrs` is read-only and sorted by index; the optional fields are None when the NSM wrote null."""

    module_id: str
    digest: str
    timestamp: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(self.pcrs.items()))))
        object.__setattr__(self, "cabundle", tuple(self.cabundle))

    @property
    def time(self) -> datetime:
        """The timestamp as an aware UTC datetime (exact to the millisecond)."""
        return datetime.fromtimestamp(self.timestamp // 1000, UTC).replace(microsecond=self.timestamp % 1000 * 1000)

    @property
    def instance_id(self) -> str | None:
        """The parent instance (``i-…``) named in `module_id`, whose id PCR4 measures; None if not AWS-shaped."""
        match = _INSTANCE.match(self.module_id)
        return match.group(1) if match else None

    def to_json(self) -> dict[str, Any]:
        """Bytes as hex, the timestamp both in ms and ISO 8601, PCRs keyed by their index."""
        def hexed(value: bytes | None) -> str | None:
            return None if value is None else value.hex()

        return {
            "module_id": self.module_id, "digest": self.digest,
            "timestamp": self.timestamp, "time": iso(self.time),
            "pcrs": {str(i): v.hex() for i, v in self.pcrs.items()},
            "certificate": self.certificate.hex(), "cabundle": [c.hex() for c in self.cabundle],
            "public_key": hexed(self.public_key), "user_data": hexed(self.user_data), "nonce": hexed(self.nonce),
        }


def iso(moment: datetime) -> str:
    """``2024-08-07T06:38:09.640Z``: milliseconds, UTC, the Z a reader expects."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_payload(doc: AttestationDocument, *, indefinite: bool = True) -> bytes:
    """The payload exactly as the NSM writes it: the nine keys in its order, null for absent optional
    fields, minimal heads (cbor2's), a definite `pcrs` map in index order. `indefinite` picks the
    current ``bf … ff`` map; False the older ``a9`` one. Refuses (AttestationError) what
    `parse_payload` would refuse."""
    values = {name: getattr(doc, name) for name in FIELDS}
    values["pcrs"] = dict(doc.pcrs)
    values["cabundle"] = list(doc.cabundle)
    _check(values)
    body = b"".join(cbor2.dumps(name) + cbor2.dumps(values[name]) for name in FIELDS)
    return b"\xbf" + body + b"\xff" if indefinite else bytes([0xA0 | len(FIELDS)]) + body  # a9: map(9)


def parse_payload(payload: bytes) -> AttestationDocument:
    """The document in `payload`, after every syntactic check; AttestationError names the first failure."""
    values = decode_exact(payload, what="payload", code="E_PAYLOAD_CBOR")
    if not isinstance(values, Mapping):
        raise AttestationError("E_PAYLOAD_CBOR", f"payload must be a CBOR map, got {_kind(values)}")
    for key in values:
        if key not in FIELDS or type(key) is not str:
            raise AttestationError("E_FIELD_UNKNOWN", f"unknown payload field {_show(key)}",
                                   fix=f"the fields are {', '.join(FIELDS)}")
    _check(values)
    found: dict[str, Any] = {name: values.get(name) for name in FIELDS}
    return AttestationDocument(**found)


def _check(values: Mapping[str, Any]) -> None:
    """Presence, then each field's type and value, in field order."""
    for name in MANDATORY:
        if name not in values:
            raise AttestationError("E_FIELD_MISSING", f"mandatory field {name!r} is missing")
        if values[name] is None:
            raise AttestationError("E_FIELD_MISSING", f"mandatory field {name!r} is null")
    module_id, digest, timestamp = values["module_id"], values["digest"], values["timestamp"]
    if type(module_id) is not str:
        raise _type("module_id must be a text string", module_id)
    if not module_id:
        raise AttestationError("E_FIELD_VALUE", "module_id is empty")
    if type(digest) is not str:
        raise _type("digest must be a text string", digest)
    if digest != DIGEST:
        raise AttestationError("E_FIELD_VALUE", f"digest is {_show(digest)}, must be 'SHA384'")
    if type(timestamp) is not int or timestamp < 0:
        raise _type("timestamp must be an unsigned integer", timestamp)
    if not 0 < timestamp <= MAX_TIMESTAMP_MS:
        raise AttestationError("E_FIELD_VALUE", f"timestamp {_show(timestamp)} is not a time after 1970 and before "
                                                "10000 (milliseconds since the epoch)")
    _check_pcrs(values["pcrs"])
    _check_bytes("certificate", values["certificate"], 1, MAX_CERT)
    cabundle = values["cabundle"]
    if not isinstance(cabundle, Sequence) or isinstance(cabundle, (str, bytes)):
        raise _type("cabundle must be an array", cabundle)
    if not cabundle:
        raise AttestationError("E_FIELD_VALUE", "cabundle is empty, must hold at least the root")
    for i, cert in enumerate(cabundle):
        _check_bytes(f"cabundle[{i}]", cert, 1, MAX_CERT)
    for name in OPTIONAL:
        value = values.get(name)
        if value is not None:
            _check_bytes(name, value, 0, MAX_OPTIONAL, nullable=True)


def _check_pcrs(pcrs: Any) -> None:
    if not isinstance(pcrs, Mapping):
        raise _type("pcrs must be a map", pcrs)
    if not 1 <= len(pcrs) <= MAX_PCRS:
        raise AttestationError("E_FIELD_VALUE", f"pcrs has {len(pcrs)} entries, must be 1..{MAX_PCRS}")
    for index, value in pcrs.items():
        if type(index) is not int:
            raise AttestationError("E_FIELD_TYPE", f"pcrs key {_show(index)} is not an integer")
        if not 0 <= index < MAX_PCRS:
            raise AttestationError("E_FIELD_VALUE", f"pcrs key {_show(index)} is out of range 0..{MAX_PCRS - 1}")
        if type(value) is not bytes:
            raise _type(f"pcrs[{index}] must be a byte string", value)
        if len(value) not in PCR_SIZES:
            raise AttestationError("E_FIELD_VALUE", f"pcrs[{index}] is {len(value)} bytes, must be 32/48/64")


def _check_bytes(name: str, value: Any, low: int, high: int, *, nullable: bool = False) -> None:
    if type(value) is not bytes:
        raise _type(f"{name} is {_kind(value)}, must be a byte string" + (" or null" if nullable else ""))
    if not low <= len(value) <= high:
        raise AttestationError("E_FIELD_VALUE", f"{name} is {len(value)} bytes, must be {low}..{high}")


def _type(message: str, value: Any = ...) -> AttestationError:
    return AttestationError("E_FIELD_TYPE", message if value is ... else f"{message}, got {_kind(value)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    """A hostile key or value, quoted and cut short."""
    if type(value) is int and value.bit_length() > 128:  # str() of a bignum is slow, then refused
        return f"a {value.bit_length()}-bit integer"
    text = repr(value) if type(value) in (str, bytes, int) else _kind(value)
    return text if len(text) <= 64 else text[:64] + "…"
