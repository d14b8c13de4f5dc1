"""The Nitro Secure Module's API messages: one CBOR request in, one CBOR response out.

The shapes are serde's externally tagged enums of aws-nitro-enclaves-nsm-api src/api/mod.rs: a
request without fields is the CBOR text of its name (`"DescribeNSM"`, `"GetRandom"`), one with
fields a one-entry map `{"DescribePCR": {"index": 16}}`, fields in declaration order; a response is
`{"<Variant>": {…}}`, the text `"LockPCR"`/`"LockPCRs"`, or `{"Error": "<ErrorCode>"}`.

Both ends live here: odyn's client encodes requests and decodes responses (`encode_request`,
`decode_response`), the simulated NSM decodes requests and encodes responses (`decode_request`,
`encode_response`). Sans-IO and pure: the standard library, `cbor_strict` and cbor2 (imported on
first encode, so an odyn start that never talks to an NSM does not pay for it). odyn's static binary
stages this module and `cbor_strict`, so it must never import `cryptography` or anything else of
`attestation`.

Limits, all checked before a request leaves the client (so a device is never called with a request
the NSM would refuse) and again by the request decoder (the simulator's input is hostile):
the whole request ≤ 4096 bytes (the driver's NSM_REQUEST_MAX_SIZE), a response ≤ 0x3000 bytes
(NSM_RESPONSE_MAX_SIZE), user_data, nonce and public_key ≤ 1024 bytes each (what AWS's nsm-check
asks of the real NSM), PCR indices 0..31 (u16 on the wire), a LockPCRs range ≤ 32, and ExtendPCR
data ≤ 4064 bytes: our bound, the largest multiple of 32 whose request (at most 28 bytes of
envelope) still fits the 4096-byte request limit. The usual datum is a 32- or 48-byte digest.

Decoding uses `cbor_strict`, not cbor2: cbor2 decodes semantic tags (regular expressions, MIME
messages, shared references) into objects, and the simulator must not do that for whatever a client
sends. Tags, floats, duplicate keys, trailing bytes and nesting deeper than the messages go are refused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

from enclaver_rules.attestation import cbor_strict

REQUEST_MAX = 0x1000  # NSM_REQUEST_MAX_SIZE: the driver refuses a larger request with EMSGSIZE
RESPONSE_MAX = 0x3000  # NSM_RESPONSE_MAX_SIZE: the buffer the driver fills
FIELD_MAX = 1024  # user_data, nonce, public_key, each
EXTEND_DATA_MAX = 4064  # ExtendPCR data: see the module docstring
PCR_COUNT = 32  # DescribeNSM.max_pcrs on every NSM (nsm-check asserts it)
PCR_SIZES = (32, 48, 64)  # SHA256, SHA384, SHA512 banks; Nitro's is SHA384: 48 bytes
DIGESTS = ("SHA256", "SHA384", "SHA512")
U16_MAX = 0xFFFF
_MAX_DEPTH = 4  # the deepest message: {"DescribeNSM": {"locked_pcrs": [0, …]}}


class ErrorCode(enum.Enum):
    """The NSM's error codes (src/api/mod.rs `ErrorCode`), with what each usually means."""

    SUCCESS = "Success"
    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_INDEX = "InvalidIndex"
    INVALID_RESPONSE = "InvalidResponse"
    READ_ONLY_INDEX = "ReadOnlyIndex"
    INVALID_OPERATION = "InvalidOperation"
    BUFFER_TOO_SMALL = "BufferTooSmall"
    INPUT_TOO_LARGE = "InputTooLarge"
    INTERNAL_ERROR = "InternalError"

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ErrorCode.SUCCESS: "an error response that says Success: the NSM contradicts itself (a faulty NSM or simulator)",
    ErrorCode.INVALID_ARGUMENT: "the request is malformed (a field of the wrong type, a request this NSM does not "
                                "know): a bug in the client",
    ErrorCode.INVALID_INDEX: f"the PCR index is out of range: PCRs are 0..{PCR_COUNT - 1}, and LockPCRs takes a "
                             f"range of at most {PCR_COUNT}",
    ErrorCode.INVALID_RESPONSE: "the answer does not match the request (a faulty NSM, device or simulator)",
    ErrorCode.READ_ONLY_INDEX: "the PCR is locked: PCRs 0..15 (the enclave's measurements) are locked at boot and "
                               "cannot be extended or locked by the enclave, PCRs 16..31 once LockPCR or LockPCRs "
                               "locked them; a locked PCR keeps its value until the enclave restarts",
    ErrorCode.INVALID_OPERATION: "this NSM cannot do that (a missing capability)",
    ErrorCode.BUFFER_TOO_SMALL: f"the answer does not fit the {RESPONSE_MAX}-byte response buffer: ask for a "
                                f"smaller document (less user_data, nonce or public_key)",
    ErrorCode.INPUT_TOO_LARGE: f"the request is too large: at most {REQUEST_MAX} bytes in all, {FIELD_MAX} bytes "
                               f"each for user_data, nonce and public_key",
    ErrorCode.INTERNAL_ERROR: "the NSM failed internally: retry; if it persists, the enclave's NSM is unhealthy",
}


class NsmError(OSError):
    """The NSM refused a request (`code` is its ErrorCode), or the request, the channel or the answer
    is wrong (`code` is what the NSM would say, or None). An OSError: a device that fails is I/O."""

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def answered(cls, request: str, code: ErrorCode) -> NsmError:
        return cls(f"the NSM answered {request} with Error {code.value}: {code.meaning}", code=code)


# --- requests ----------------------------------------------------------------------------------


def _index(request: str, name: str, value: object, limit: int) -> int:
    """A u16 on the wire, then within `limit` (InvalidIndex, as the NSM answers)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U16_MAX:
        raise NsmError(f"{request}.{name} must be an integer 0..{U16_MAX} (u16), not {value!r:.40}",
                       code=ErrorCode.INVALID_ARGUMENT)
    if value > limit:
        raise NsmError(f"{request}.{name} {value} is out of range: at most {limit} (PCRs are 0..{PCR_COUNT - 1})",
                       code=ErrorCode.INVALID_INDEX)
    return value


def _data(request: str, name: str, value: object, limit: int, *, optional: bool) -> bytes | None:
    if value is None and optional:
        return None
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise NsmError(f"{request}.{name} must be a byte string{' or null' if optional else ''}, not "
                       f"{type(value).__name__}", code=ErrorCode.INVALID_ARGUMENT)
    if len(value) > limit:
        raise NsmError(f"{request}.{name} is {len(value)} bytes: the NSM takes at most {limit}",
                       code=ErrorCode.INPUT_TOO_LARGE)
    return value


@dataclass(frozen=True, slots=True)
class DescribeNsm:
    NAME: ClassVar[str] = "DescribeNSM"


@dataclass(frozen=True, slots=True)
class DescribePcr:
    index: int
    NAME: ClassVar[str] = "DescribePCR"

    def __post_init__(self) -> None:
        _index(self.NAME, "index", self.index, PCR_COUNT - 1)


@dataclass(frozen=True, slots=True)
class ExtendPcr:
    index: int
    data: bytes
    NAME: ClassVar[str] = "ExtendPCR"

    def __post_init__(self) -> None:
        _index(self.NAME, "index", self.index, PCR_COUNT - 1)
        object.__setattr__(self, "data", _data(self.NAME, "data", self.data, EXTEND_DATA_MAX, optional=False))


@dataclass(frozen=True, slots=True)
class LockPcr:
    index: int
    NAME: ClassVar[str] = "LockPCR"

    def __post_init__(self) -> None:
        _index(self.NAME, "index", self.index, PCR_COUNT - 1)


@dataclass(frozen=True, slots=True)
class LockPcrs:
    """Lock PCRs [0, range)."""

    range: int
    NAME: ClassVar[str] = "LockPCRs"

    def __post_init__(self) -> None:
        _index(self.NAME, "range", self.range, PCR_COUNT)


@dataclass(frozen=True, slots=True)
class Attestation:
    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None
    NAME: ClassVar[str] = "Attestation"

    def __post_init__(self) -> None:
        for name in ("user_data", "nonce", "public_key"):
            object.__setattr__(self, name, _data(self.NAME, name, getattr(self, name), FIELD_MAX, optional=True))


@dataclass(frozen=True, slots=True)
class GetRandom:
    NAME: ClassVar[str] = "GetRandom"


Request: TypeAlias = DescribeNsm | DescribePcr | ExtendPcr | LockPcr | LockPcrs | Attestation | GetRandom
_UNIT_REQUESTS: dict[str, Request] = {"DescribeNSM": DescribeNsm(), "GetRandom": GetRandom()}
#: Each struct request's fields, in declaration order (the wire order), and which may be null.
_REQUEST_FIELDS: dict[str, tuple[type[Request], tuple[str, ...], bool]] = {
    "DescribePCR": (DescribePcr, ("index",), False),
    "ExtendPCR": (ExtendPcr, ("index", "data"), False),
    "LockPCR": (LockPcr, ("index",), False),
    "LockPCRs": (LockPcrs, ("range",), False),
    "Attestation": (Attestation, ("user_data", "nonce", "public_key"), True),
}


def _request_value(request: Request) -> object:
    if isinstance(request, DescribeNsm | GetRandom):
        return request.NAME
    _, names, _ = _REQUEST_FIELDS[request.NAME]
    return {request.NAME: {name: getattr(request, name) for name in names}}


def encode_request(request: Request) -> bytes:
    """The request's bytes, as the device takes them. The fields were checked when the request was
    made; the total is checked here (NsmError InputTooLarge)."""
    body = _dumps(_request_value(request))
    if len(body) > REQUEST_MAX:  # only reachable by a request type with more data than today's
        raise NsmError(f"the {request.NAME} request is {len(body)} bytes: the NSM takes at most {REQUEST_MAX}",
                       code=ErrorCode.INPUT_TOO_LARGE)
    return body


def decode_request(data: bytes) -> Request:
    """A request from untrusted bytes (the simulator's side), or NsmError with the ErrorCode the
    NSM answers: InputTooLarge (over 4096 bytes, or a field over its limit), InvalidIndex, or
    InvalidArgument (not CBOR, not a request, a field missing, unknown or of the wrong type)."""
    if len(data) > REQUEST_MAX:
        raise NsmError(f"the request is {len(data)} bytes: the NSM takes at most {REQUEST_MAX}",
                       code=ErrorCode.INPUT_TOO_LARGE)
    value = _loads(data, "the request", ErrorCode.INVALID_ARGUMENT)
    bad = ErrorCode.INVALID_ARGUMENT
    if isinstance(value, str):
        if value in _UNIT_REQUESTS:
            return _UNIT_REQUESTS[value]
        what = "needs fields" if value in _REQUEST_FIELDS else "is not an NSM request"
        raise NsmError(f"the request {value!r:.40} {what}", code=bad)
    if not isinstance(value, dict) or len(value) != 1:
        raise NsmError("the request is neither a request name nor a one-entry map {name: fields}", code=bad)
    ((name, fields),) = value.items()
    if name not in _REQUEST_FIELDS:
        raise NsmError(f"the request {name!r:.40} is not an NSM request with fields", code=bad)
    kind, names, optional = _REQUEST_FIELDS[name]
    if not isinstance(fields, dict):
        raise NsmError(f"the fields of {name} are not a map", code=bad)
    unknown = sorted(str(k) for k in fields if k not in names)
    if unknown:
        raise NsmError(f"{name} has no field {unknown[0]!r:.40} (its fields: {', '.join(names)})", code=bad)
    missing = [n for n in names if n not in fields]
    if missing and not optional:  # serde: a missing Option field is None, a missing u16 an error
        raise NsmError(f"{name} lacks its field {missing[0]!r}", code=bad)
    return kind(**{n: fields.get(n) for n in names})  # type: ignore[arg-type]  # the types are checked there


# --- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NsmDescription:
    """DescribeNSM's answer."""

    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]  # sorted
    digest: str  # "SHA384" on Nitro
    version: tuple[int, int, int] = (1, 0, 0)
    NAME: ClassVar[str] = "DescribeNSM"


@dataclass(frozen=True, slots=True)
class PcrState:
    """DescribePCR's answer: the register's value and whether it is locked."""

    lock: bool
    data: bytes
    NAME: ClassVar[str] = "DescribePCR"


@dataclass(frozen=True, slots=True)
class ExtendedPcr:
    """ExtendPCR's answer: the register's new value."""

    data: bytes
    NAME: ClassVar[str] = "ExtendPCR"


@dataclass(frozen=True, slots=True)
class PcrLocked:
    NAME: ClassVar[str] = "LockPCR"


@dataclass(frozen=True, slots=True)
class PcrsLocked:
    NAME: ClassVar[str] = "LockPCRs"


@dataclass(frozen=True, slots=True)
class AttestationDocument:
    """Attestation's answer: the signed COSE_Sign1 document, as the NSM made it."""

    document: bytes = field(repr=False)
    NAME: ClassVar[str] = "Attestation"


@dataclass(frozen=True, slots=True)
class RandomBytes:
    random: bytes = field(repr=False)
    NAME: ClassVar[str] = "GetRandom"


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    code: ErrorCode
    NAME: ClassVar[str] = "Error"


Response: TypeAlias = (NsmDescription | PcrState | ExtendedPcr | PcrLocked | PcrsLocked | AttestationDocument
                       | RandomBytes | ErrorResponse)


def _response_value(response: Response) -> object:
    match response:
        case PcrLocked() | PcrsLocked():
            return response.NAME
        case ErrorResponse(code):
            return {"Error": code.value}
        case NsmDescription():
            major, minor, patch = response.version
            return {"DescribeNSM": {"version_major": major, "version_minor": minor, "version_patch": patch,
                                    "module_id": response.module_id, "max_pcrs": response.max_pcrs,
                                    "locked_pcrs": sorted(response.locked_pcrs), "digest": response.digest}}
        case PcrState(lock, data):
            return {"DescribePCR": {"lock": lock, "data": data}}
        case ExtendedPcr(data):
            return {"ExtendPCR": {"data": data}}
        case AttestationDocument(document):
            return {"Attestation": {"document": document}}
        case RandomBytes(random):
            return {"GetRandom": {"random": random}}
    raise TypeError(f"not an NSM response: {response!r:.60}")  # pragma: no cover - exhaustive above


def encode_response(response: Response) -> bytes:
    """The response's bytes (the simulator's side). One over 0x3000 bytes is the simulator's bug,
    and the real driver would truncate it: refuse it as the NSM would, with BufferTooSmall."""
    body = _dumps(_response_value(response))
    if len(body) > RESPONSE_MAX:
        return _dumps({"Error": ErrorCode.BUFFER_TOO_SMALL.value})
    return body


def encode_error(code: ErrorCode) -> bytes:
    return encode_response(ErrorResponse(code))


def decode_response(request: Request, data: bytes) -> Response:
    """The answer to `request`, typed; NsmError for an Error answer (with its code) or an answer that
    is not one (not CBOR, another variant, a field missing or of the wrong type: code InvalidResponse)."""
    name = request.NAME
    if len(data) > RESPONSE_MAX:
        raise NsmError(f"the NSM's {name} answer is {len(data)} bytes, over the {RESPONSE_MAX}-byte limit",
                       code=ErrorCode.INVALID_RESPONSE)
    value = _loads(data, f"the NSM's {name} answer", ErrorCode.INVALID_RESPONSE)
    expected = name  # every answer is named after its request
    if isinstance(value, dict) and len(value) == 1 and "Error" in value:
        code = value["Error"]
        known = {c.value: c for c in ErrorCode}
        if isinstance(code, str) and code in known:
            raise NsmError.answered(name, known[code])
        raise NsmError(f"the NSM answered {name} with an unknown error {code!r:.60}", code=ErrorCode.INVALID_RESPONSE)
    if expected in ("LockPCR", "LockPCRs"):
        if value == expected:
            return PcrLocked() if expected == "LockPCR" else PcrsLocked()
        raise _odd(name, value)
    if not (isinstance(value, dict) and len(value) == 1 and isinstance(value.get(expected), dict)):
        raise _odd(name, value)
    fields: dict[object, object] = value[expected]
    try:
        return _typed(expected, fields)
    except (KeyError, TypeError, ValueError):
        raise _odd(name, value) from None


def _odd(name: str, value: object) -> NsmError:
    return NsmError(f"the NSM answered {name} with {value!r:.200}", code=ErrorCode.INVALID_RESPONSE)


def _typed(variant: str, f: dict[object, object]) -> Response:
    """The variant's fields; KeyError/TypeError/ValueError when they are not what the API says."""
    def get(name: str, kind: type) -> object:
        v = f[name]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise TypeError(name)
        return v

    if variant == "DescribeNSM":
        locked = get("locked_pcrs", list)
        assert isinstance(locked, list)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= U16_MAX for i in locked):
            raise TypeError("locked_pcrs")
        digest, module_id = get("digest", str), get("module_id", str)
        if digest not in DIGESTS:
            raise ValueError("digest")
        major, minor, patch, max_pcrs = (_u16(get(n, int)) for n in
                                         ("version_major", "version_minor", "version_patch", "max_pcrs"))
        return NsmDescription(str(module_id), max_pcrs, tuple(sorted(locked)), str(digest), (major, minor, patch))
    if variant == "DescribePCR":
        lock, data = get("lock", bool), _pcr(get("data", bytes))
        return PcrState(bool(lock), data)
    if variant == "ExtendPCR":
        return ExtendedPcr(_pcr(get("data", bytes)))
    if variant == "Attestation":
        return AttestationDocument(_nonempty(get("document", bytes)))
    if variant == "GetRandom":
        return RandomBytes(_nonempty(get("random", bytes)))
    raise KeyError(variant)  # pragma: no cover - the lock answers are texts, handled by the caller


def _u16(v: object) -> int:
    if not isinstance(v, int) or not 0 <= v <= U16_MAX:
        raise ValueError(v)
    return v


def _pcr(v: object) -> bytes:
    if not isinstance(v, bytes) or len(v) not in PCR_SIZES:
        raise ValueError("a PCR value is 32, 48 or 64 bytes")
    return v


def _nonempty(v: object) -> bytes:
    if not isinstance(v, bytes) or not v:
        raise ValueError("empty")
    return v


# --- CBOR: cbor2 to write, cbor_strict to read -------------------------------------------------


def _dumps(value: object) -> bytes:
    import cbor2  # here, not at the top: see the module docstring

    return cbor2.dumps(value)


def _loads(data: bytes, what: str, code: ErrorCode) -> object:
    try:
        return cbor_strict.decode(data, max_depth=_MAX_DEPTH)  # no tags
    except cbor_strict.CborError as e:
        raise NsmError(f"{what} is not CBOR this API uses: {e}", code=code) from None
