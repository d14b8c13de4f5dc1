"""The attestation API: `POST http://127.0.0.1:<api.listen_port>/v1/attestation` returns an NSM
attestation document (COSE_Sign1 CBOR, `application/cbor`) over the caller's nonce, user data and
public key. Upstream enclaver's API (compat notes, "Attestation API"), kept stricter where the
bytes are ambiguous and clearer where upstream is silent.

The request body is a JSON object with three optional fields, each a string or null; unknown
fields are ignored. `nonce` and `user_data` are base64: the standard or the URL-safe alphabet,
padded or not, with no whitespace, in the one canonical spelling of the bytes. `public_key` is
one PEM block of any label but a private key's (the NSM gets the whole DER of the block, as
upstream HEAD gives it; the block must hold one DER SEQUENCE), or base64 of the bytes to attest
as they are. Each field holds at most 1024 bytes once decoded (the NSM's limit); a field given
twice is refused. `parse_request` is the pure parser: any bytes give a request or an `ApiError`.

The server (`local_http`, shared with the KMS proxy) speaks HTTP/1.1 on 127.0.0.1 only, one request
per connection (`Connection: close`).
The request head is read by `http_head` (strict RFC 9112; 431 for a head over 64 KiB or 100
headers). A query string is ignored (upstream routes on the path alone). Another path gets 404,
another method on the path 405 with `Allow: POST`, both with a one-line text body (upstream sends
none; no client reads them, people do). The body needs `Content-Length` (411 without, chunked
included) of at most 16 KiB (413, decided before a byte of it is read; `Expect: 100-continue` is
honoured). The head and the body must arrive within `request_timeout` of the accept (408),
however they trickle in, and at most `max_connections` connections are served at once (one more
gets 503). The NSM is called in a thread, one call at a time (the driver serialises them anyway,
and a hung NSM then holds one thread, not the default executor); a request waits at most
`nsm_timeout` for it (504). The NSM's error is 502 with its message, any other failure 500; both
also go to odyn's log, throttled. Upstream closes the connection without an answer there.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from enclaver_rules.link.transport import Handler
from odyn.connections import Gate, Log
from odyn.http_head import Request, absolute_target
from odyn.local_http import HttpError, LocalServer, answer, listen, untracked
from odyn.nsm import NsmError

PATH = "/v1/attestation"
FIELDS = ("nonce", "user_data", "public_key")
MAX_FIELD = 1024  # bytes of each field once decoded: the NSM's limit for user_data, nonce and public_key
MAX_BODY = 16 << 10  # three full fields take under 5 KiB as JSON; the rest is room for unknown fields
MAX_CONNECTIONS = 64  # each holds at most a 64 KiB head and a 16 KiB body
REQUEST_TIMEOUT = 10.0  # absolute: from the accept to the last byte of the body (a local client)
NSM_TIMEOUT = 30.0  # a request's wait for the NSM, its turn included; the driver gives up at 2 minutes


class Attester(Protocol):
    """The one NSM call the API makes; blocking (an ioctl, or a socket to the simulated NSM).
    Raises `odyn.nsm.NsmError` when the NSM refuses or fails."""

    def attestation(self, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes: ...


class ApiError(HttpError):
    """A request the API answers with `status` and `message` (one line of text) instead of a document."""


@dataclass(frozen=True, slots=True)
class AttestationRequest:
    """What goes to the NSM. None: the field was absent or null (the document then says null)."""

    nonce: bytes | None = None
    user_data: bytes | None = None
    public_key: bytes | None = None


# -- the request body, sans-IO --------------------------------------------------------------------


class _Object(list[tuple[str, object]]):
    """A JSON object as its key/value pairs in order, so a field given twice can be refused."""


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_request(body: bytes, content_type: str | None = None) -> AttestationRequest:
    """The fields of an attestation request body; `ApiError` (400) for anything else, never
    another exception. `content_type` is not enforced (upstream ignores it, and `curl -d` sends
    `application/x-www-form-urlencoded`); it only makes the error for a body that is not JSON
    clearer."""
    if not body.strip(b" \t\r\n"):
        raise ApiError(400, "the body is empty: send a JSON object ({} for a document without nonce, "
                            "user_data or public_key)")
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=_Object, parse_constant=_no_constant,
                              parse_int=float)  # float: no limit on digits, and numbers are only ignored
    except RecursionError:
        raise ApiError(400, "the body is not usable JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN
        sent = "" if content_type is None or "json" in content_type.lower() else f" (it was sent as {content_type[:80]})"
        raise ApiError(400, f"the body is not JSON{sent}: {e}") from None
    if not isinstance(document, _Object):
        raise ApiError(400, f"the body must be a JSON object, not {_kind(document)}")
    given: dict[str, object] = {}
    for key, value in document:
        if key in FIELDS:
            if key in given:
                raise ApiError(400, f"{key} is given twice")
            given[key] = value
    return AttestationRequest(nonce=_field("nonce", given.get("nonce")),
                              user_data=_field("user_data", given.get("user_data")),
                              public_key=_field("public_key", given.get("public_key")))


def _field(name: str, value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        kind = "a PEM block or a base64 string" if name == "public_key" else "a base64 string"
        raise ApiError(400, f"{name} must be {kind} or null, not {_kind(value)}")
    if name == "public_key" and value.lstrip(" \t\r\n").startswith("-----BEGIN"):
        data = _pem(value)
    else:
        data = _base64(name, value)
    if len(data) > MAX_FIELD:
        raise ApiError(400, f"{name} is {len(data)} bytes once decoded; the NSM takes at most {MAX_FIELD}")
    return data


def _kind(value: object) -> str:
    if isinstance(value, _Object):
        return "an object"
    if isinstance(value, bool):
        return "a boolean"
    return {list: "an array", str: "a string", int: "a number", float: "a number"}.get(type(value), "null")


_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*(={0,2})")
_URLSAFE = str.maketrans("-_", "+/")


def _base64(name: str, text: str, *, standard_only: bool = False) -> bytes:
    """Base64 in the standard or URL-safe alphabet (not both in one string), padded or not; only
    the canonical spelling (unused bits of the last character zero), so one string, one value."""
    match = _BASE64.fullmatch(text)
    if match is None:
        bad = next((c for c in text if not (c.isascii() and (c.isalnum() or c in "+/_-="))), None)
        if bad is None:
            what = "= padding somewhere other than at the end, or more than two of it"
        elif bad.isspace():
            what = "whitespace (send it on one line: base64 -w0)"
        else:
            what = f"the character {bad!r}"
        raise ApiError(400, f"{name} is not base64: it has {what}")
    digits = text[:match.start(1)]
    if ("+" in digits or "/" in digits) and ("-" in digits or "_" in digits):
        raise ApiError(400, f"{name} is not base64: it mixes the standard (+/) and URL-safe (-_) alphabets")
    if standard_only and ("-" in digits or "_" in digits):
        raise ApiError(400, f"{name} is not base64 in the standard alphabet: it has - or _")
    if len(digits) % 4 == 1 or (match.group(1) and len(text) % 4):
        raise ApiError(400, f"{name} is not base64: its length ({len(text)} characters) or padding is wrong")
    standard = digits.translate(_URLSAFE)
    data = base64.b64decode(standard + "=" * (-len(standard) % 4))
    if base64.b64encode(data).decode("ascii").rstrip("=") != standard:
        raise ApiError(400, f"{name} is not canonical base64: its last character has bits set that encode nothing")
    return data


_LABEL = r"[\x21-\x2c\x2e-\x7e](?:[- ]?[\x21-\x2c\x2e-\x7e])*"  # RFC 7468 §3
_BEGIN = re.compile(rf"-----BEGIN ({_LABEL})?-----")
_END = re.compile(rf"-----END ({_LABEL})?-----")


def _pem(text: str) -> bytes:
    """The DER of one PEM block (RFC 7468, any label but a private key's). Parsed line by line, no
    backtracking regular expression: a hostile 16 KiB string costs linear time."""
    lines = [line.strip(" \t\r") for line in text.strip(" \t\r\n").split("\n")]
    begin, end = _BEGIN.fullmatch(lines[0]), _END.fullmatch(lines[-1])
    if len(lines) < 2 or begin is None or end is None:
        raise ApiError(400, "public_key is not a PEM block: it needs a -----BEGIN <label>----- line first and "
                            "an -----END <label>----- line last")
    label = begin.group(1) or ""
    if (end.group(1) or "") != label:
        raise ApiError(400, f"public_key: the PEM block begins as {label!r} but ends as {end.group(1) or ''!r}")
    if "PRIVATE" in label:
        raise ApiError(400, f"public_key is a {label}: send the public key (an attestation document is public)")
    content = "".join(lines[1:-1])
    if "-----" in content:
        raise ApiError(400, "public_key has more than one PEM block: send one")
    if ":" in content:
        raise ApiError(400, "public_key: the PEM block has headers (Proc-Type, DEK-Info: an encrypted key?), "
                            "which are not accepted")
    der = _base64("public_key (the PEM block's base64)", content, standard_only=True)
    if not _one_der_sequence(der):
        raise ApiError(400, "public_key: the PEM block does not hold one DER SEQUENCE (a SubjectPublicKeyInfo, "
                            "a PKCS#1 key, a certificate …)")
    return der


def _one_der_sequence(der: bytes) -> bool:
    """Whether `der` is exactly one DER TLV with the SEQUENCE tag (contents not parsed), as the
    `der` crate upstream checks a PEM block."""
    if len(der) < 2 or der[0] != 0x30:
        return False
    if der[1] < 0x80:
        return 2 + der[1] == len(der)
    count = der[1] & 0x7F
    if not 1 <= count <= 4 or len(der) < 2 + count or der[2] == 0:  # indefinite, too long, or not minimal
        return False
    length = int.from_bytes(der[2:2 + count], "big")
    return length >= 0x80 and 2 + count + length == len(der)


# -- HTTP -----------------------------------------------------------------------------------------


def route(request: Request) -> None:
    """404 for another path, 405 for another method; the query string does not count."""
    target = request.target
    if target[:8].lower().startswith(("http://", "https://")):  # absolute-form, which servers must accept
        target = absolute_target(target).path
    if target.partition("?")[0] != PATH:
        raise ApiError(404, f"not found: the attestation API serves only POST {PATH}")
    if request.method != "POST":
        raise ApiError(405, f"{request.method} is not allowed: {PATH} takes POST")


@dataclass
class NsmTurns:
    """Attestation documents from a blocking NSM, for asyncio callers: each call in a thread, one
    at a time (the driver serialises them anyway, and a hung NSM then holds one thread, not the
    default executor), a caller waiting at most `timeout` for it, its turn included. Errors as
    `ApiError`: 502 the NSM failed, 504 no answer in time, 500 anything else (an attester's bug)."""

    attester: Attester
    timeout: float = NSM_TIMEOUT
    calls: set[asyncio.Task[bytes]] = field(init=False, default_factory=set)
    _turn: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    async def attest(self, request: AttestationRequest) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                await self._turn.acquire()
                call = asyncio.ensure_future(asyncio.to_thread(
                    self.attester.attestation, user_data=request.user_data, nonce=request.nonce,
                    public_key=request.public_key))
                self.calls.add(call)
                call.add_done_callback(self._call_done)  # the turn passes on when the thread is done, not before
                return await asyncio.shield(call)
        except TimeoutError:
            raise ApiError(504, f"the NSM did not answer within {self.timeout:g} s") from None
        except NsmError as e:
            raise ApiError(502, f"the NSM failed: {e!s:.300}") from None
        except Exception as e:  # noqa: BLE001 - an attester's bug answers 500 and is logged, odyn stays up
            raise ApiError(500, f"internal error asking the NSM: {type(e).__name__}: {e!s:.300}") from None

    def _call_done(self, call: asyncio.Task[bytes]) -> None:
        self.calls.discard(call)
        self._turn.release()
        if not call.cancelled():
            call.exception()  # retrieved: a call whose request timed out is not an unhandled error


@dataclass
class AttestationApi:
    attester: Attester
    request_timeout: float = REQUEST_TIMEOUT
    nsm_timeout: float = NSM_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_body: int = MAX_BODY
    log: Log | None = None  # where lines go; default `odyn.connections.log`
    server: LocalServer = field(init=False)
    _nsm: NsmTurns = field(init=False)

    def __post_init__(self) -> None:
        self.server = LocalServer("attestation API", self, self.request_timeout, self.max_connections,
                                  self.max_body, self.log)
        self._nsm = NsmTurns(self.attester, self.nsm_timeout)

    @property
    def gate(self) -> Gate:
        return self.server.gate

    @property
    def _calls(self) -> set[asyncio.Task[bytes]]:
        return self._nsm.calls

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.server.handle(reader, writer)

    def route(self, request: Request) -> None:
        route(request)

    def error(self, status: int, message: str, *, head_only: bool = False) -> bytes:
        return answer(status, message, head_only=head_only)

    async def respond(self, request: Request, body: bytes) -> bytes:
        try:
            document = await self.attest(parse_request(body, request.header("content-type")))
        except ApiError as e:
            if e.status >= 500:
                self.server.say(str(e.status), f"odyn: attestation API: {e.message}")
            return answer(e.status, e.message)
        return answer(200, document, "application/cbor")

    async def attest(self, request: AttestationRequest) -> bytes:
        """The NSM's document for `request`, or ApiError 502 (the NSM failed), 504 (no answer within
        `nsm_timeout`, waiting for its turn included) or 500 (anything else)."""
        return await self._nsm.attest(request)


async def serve(api: AttestationApi, port: int, track: Callable[[Handler], Handler] = untracked, *,
                host: str = "127.0.0.1") -> asyncio.AbstractServer:
    """Listen on `host:port` (127.0.0.1: only the enclave's own processes can reach it)."""
    return await listen(api.handle, "attestation API", port, track, host=host)
