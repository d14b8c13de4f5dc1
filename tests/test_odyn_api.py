"""odyn's attestation API: the pure request parser (units and hypothesis properties), the server over
real 127.0.0.1 sockets with a fake NSM (every answer, hostile clients, NSM failures, odyn serving on
after each), and the supervisor end to end (an app inside asks, the manifest decides, no NSM is fatal).
Timeouts are set small; the tests assert outcomes, never how fast they came."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from enclaver_rules.link.transport import UnixTransport
from odyn import api
from odyn.api import ApiError, AttestationApi, AttestationRequest, parse_request
from odyn.nsm import NsmError
from odyn.supervisor import EXIT_FATAL, Supervisor

LIMIT = 20.0  # seconds any single wait may take before it counts as a hang
DOCUMENT = bytes(range(256)) * 17 + b"\x84\x44\xa1\x01\x38\x22"  # stands in for a COSE_Sign1 document


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _refused(body: bytes, content_type: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_request(body, content_type)
    assert caught.value.status == 400
    return caught.value


def _pem(der: bytes, label: str, width: int = 64, newline: str = "\n") -> str:
    text = _b64(der)
    lines = [text[i:i + width] for i in range(0, len(text), width)]
    return newline.join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""])


EC_KEY = ec.generate_private_key(ec.SECP384R1())
SPKI_DER = EC_KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
SPKI_PEM = EC_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# -- parse_request: units -------------------------------------------------------------------------


def test_an_empty_object_asks_for_a_document_without_fields() -> None:
    assert parse_request(b"{}", "application/json") == AttestationRequest(None, None, None)


def test_base64_fields_decode_and_null_means_absent() -> None:
    parsed = parse_request(_body(nonce=_b64(b"the nonce"), user_data=_b64(b"my data"), public_key=None))
    assert parsed == AttestationRequest(nonce=b"the nonce", user_data=b"my data", public_key=None)
    assert parse_request(_body(nonce="")).nonce == b""  # present but empty: not the same as absent


def test_url_safe_and_unpadded_base64_are_accepted() -> None:
    data = b"\xfb\xff\xfe?>"
    assert _b64(data) == "+//+Pz4="
    for spelling in ("+//+Pz4=", "+//+Pz4", "-__-Pz4=", "-__-Pz4"):
        assert parse_request(_body(user_data=spelling)).user_data == data, spelling


def test_unknown_fields_are_ignored_whatever_they_hold() -> None:
    body = b'{"nonce": "AAAA", "extra": {"deep": [1, 2.5, true, null, "x", {"nonce": 7}]}, "n": ' + b"9" * 5000 + b"}"
    assert parse_request(body) == AttestationRequest(nonce=b"\0\0\0")


@pytest.mark.parametrize(("body", "words"), [
    (b"", "empty"),
    (b" \r\n", "empty"),
    (b"{", "not JSON"),
    (b"\xff{}", "not JSON"),
    (b'{"a": NaN}', "not JSON"),
    (b"[]", "JSON object, not an array"),
    (b'"x"', "JSON object, not a string"),
    (b"null", "JSON object, not null"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"nonce": "AA==", "nonce": "AA=="}', "nonce is given twice"),
    (b'{"nonce": 5}', "nonce must be a base64 string or null, not a number"),
    (b'{"user_data": ["AA=="]}', "user_data must be a base64 string or null, not an array"),
    (b'{"public_key": {}}', "public_key must be a PEM block or a base64 string or null, not an object"),
    (b'{"nonce": true}', "not a boolean"),
])
def test_bodies_that_are_refused(body: bytes, words: str) -> None:
    assert words in _refused(body).message


def test_the_content_type_only_explains_a_body_that_is_not_json() -> None:
    assert "sent as application/x-www-form-urlencoded" in _refused(b"nonce=abc",
                                                                   "application/x-www-form-urlencoded").message
    assert "sent as" not in _refused(b"nonce=abc", "application/json").message
    # not enforced: curl -d sends form-urlencoded, and upstream ignores the type
    assert parse_request(b"{}", "application/x-www-form-urlencoded") == AttestationRequest()


@pytest.mark.parametrize(("value", "words"), [
    ("AA AA", "whitespace"),
    ("AAAA\n", "whitespace"),
    ("AA*A", "the character '*'"),
    ("AAé=", "the character 'é'"),
    ("A=AA", "= padding"),
    ("AA===", "= padding"),
    ("+/-_", "mixes the standard (+/) and URL-safe (-_) alphabets"),
    ("AAAAA", "length"),
    ("AA=", "padding is wrong"),
    ("AAAA==", "padding is wrong"),
    ("AB==", "not canonical"),  # "AA==" is the one spelling of b"\0"
    ("\ud800", "the character"),
])
def test_bad_base64_is_refused_naming_the_field(value: str, words: str) -> None:
    for name in ("nonce", "user_data"):
        error = _refused(_body(**{name: value}))
        assert error.message.startswith(name) and words in error.message, error.message


def test_each_field_holds_at_most_1024_bytes() -> None:
    for name in ("nonce", "user_data", "public_key"):
        assert getattr(parse_request(_body(**{name: _b64(bytes(1024))})), name) == bytes(1024)
        error = _refused(_body(**{name: _b64(bytes(1025))}))
        assert error.message == f"{name} is 1025 bytes once decoded; the NSM takes at most 1024"


def test_a_pem_public_key_gives_the_whole_der_of_its_block() -> None:
    assert parse_request(_body(public_key=SPKI_PEM)).public_key == SPKI_DER
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pkcs1 = rsa_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    # any label (upstream HEAD): PKCS#1's RSA PUBLIC KEY gives the PKCS#1 DER, not an SPKI
    assert parse_request(_body(public_key=_pem(pkcs1, "RSA PUBLIC KEY"))).public_key == pkcs1
    # CRLF, other line widths, and whitespace around the block are fine
    assert parse_request(_body(public_key="\n  " + _pem(SPKI_DER, "PUBLIC KEY", 76, "\r\n"))).public_key == SPKI_DER


def test_a_base64_public_key_is_taken_as_it_is() -> None:
    assert parse_request(_body(public_key=_b64(SPKI_DER))).public_key == SPKI_DER
    raw = bytes(range(32))  # an X25519 key, say: not DER, and the NSM does not mind
    assert parse_request(_body(public_key=_b64(raw))).public_key == raw


@pytest.mark.parametrize(("pem", "words"), [
    (_pem(b"0\x00", "PRIVATE KEY"), "is a PRIVATE KEY: send the public key"),
    (_pem(b"0\x00", "EC PRIVATE KEY"), "is a EC PRIVATE KEY"),
    (_pem(SPKI_DER, "PUBLIC KEY").replace("END PUBLIC", "END RSA PUBLIC"), "begins as 'PUBLIC KEY' but ends as"),
    ("-----BEGIN PUBLIC KEY-----\nMAA=\n", "not a PEM block"),
    ("-----BEGIN PUBLIC KEY-----", "not a PEM block"),
    ("-----BEGIN PUBLIC  KEY-----\nMAA=\n-----END PUBLIC  KEY-----", "not a PEM block"),
    (_pem(b"0\x00", "PUBLIC KEY") + _pem(b"0\x00", "PUBLIC KEY"), "more than one PEM block"),
    ("-----BEGIN RSA PUBLIC KEY-----\nProc-Type: 4,ENCRYPTED\nMAA=\n-----END RSA PUBLIC KEY-----", "headers"),
    (_pem(b"0\x00", "PUBLIC KEY").replace("MAA=", "MA-="), "standard alphabet"),
    (_pem(b"0\x00", "PUBLIC KEY").replace("MAA=", "MA*="), "not base64"),
    (_pem(b"\x04\x00", "PUBLIC KEY"), "does not hold one DER SEQUENCE"),  # not a SEQUENCE
    (_pem(b"0\x01", "PUBLIC KEY"), "does not hold one DER SEQUENCE"),  # too short for its length
    (_pem(b"0\x00\x00", "PUBLIC KEY"), "does not hold one DER SEQUENCE"),  # trailing bytes
    (_pem(b"0\x81\x05" + bytes(5), "PUBLIC KEY"), "does not hold one DER SEQUENCE"),  # length not minimal
    (_pem(b"0\x80\x00\x00", "PUBLIC KEY"), "does not hold one DER SEQUENCE"),  # indefinite length (BER)
    (_pem(b"", "PUBLIC KEY"), "does not hold one DER SEQUENCE"),
    (_pem(b"0\x82\x04\x01" + bytes(0x401), "PUBLIC KEY"), "1029 bytes once decoded; the NSM takes at most 1024"),
])
def test_bad_pem_is_refused(pem: str, words: str) -> None:
    error = _refused(_body(public_key=pem))
    assert error.message.startswith("public_key") and words in error.message, error.message


def test_der_lengths_in_long_form_are_accepted() -> None:
    der = b"0\x81\x80" + bytes(0x80)
    assert parse_request(_body(public_key=_pem(der, "PUBLIC KEY"))).public_key == der
    der = b"0\x82\x01\x00" + bytes(0x100)
    assert parse_request(_body(public_key=_pem(der, "X"))).public_key == der


def test_a_hostile_pem_costs_linear_time() -> None:
    """No backtracking regular expression over the value: 16 KiB built to make one go quadratic
    parses at once (the assertion is the outcome; a quadratic parser would take minutes)."""
    hostile = "-----BEGIN A-----\n" + "-----END " * 1800
    assert "public_key" in _refused(_body(public_key=hostile)).message


# -- parse_request: properties --------------------------------------------------------------------


@given(st.binary(max_size=4096))
def test_any_bytes_give_a_request_or_a_400(body: bytes) -> None:
    try:
        assert isinstance(parse_request(body), AttestationRequest)
    except ApiError as e:
        assert e.status == 400 and e.message


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_field_value = st.none() | st.text(max_size=64) | st.text(alphabet="ABCDabcd0129+/-_= \n", max_size=40) | _json


@given(st.dictionaries(st.sampled_from(["nonce", "user_data", "public_key", "other"]), _field_value),
       st.sampled_from([None, "application/json", "text/plain"]))
def test_any_json_object_gives_a_request_or_a_400_naming_a_field(fields: dict[str, object],
                                                                 content_type: str | None) -> None:
    try:
        parse_request(json.dumps(fields).encode(), content_type)
    except ApiError as e:
        assert e.status == 400 and e.message.startswith(("nonce", "user_data", "public_key")), e.message


def _spell(data: bytes, spelling: str) -> str:
    text = base64.b64encode(data).decode()
    if "urlsafe" in spelling:
        text = text.replace("+", "-").replace("/", "_")
    return text.rstrip("=") if "unpadded" in spelling else text


_spelling = st.sampled_from(["standard", "standard unpadded", "urlsafe", "urlsafe unpadded"])


@st.composite
def _der_sequence(draw: st.DrawFn) -> bytes:
    content = draw(st.binary(max_size=1000))
    n = len(content)
    length = bytes([n]) if n < 0x80 else (bytes([0x81, n]) if n < 0x100 else bytes([0x82]) + n.to_bytes(2, "big"))
    return b"\x30" + length + content


_label = st.sampled_from(["PUBLIC KEY", "RSA PUBLIC KEY", "CERTIFICATE", "X", "A-B C"])


@given(st.none() | st.binary(max_size=1024), st.none() | st.binary(max_size=1024), _spelling, _spelling,
       st.none() | st.tuples(st.just("base64"), st.binary(max_size=1024), _spelling, st.just(""), st.just(64))
       | st.tuples(st.just("pem"), _der_sequence(), st.just("standard"), _label, st.integers(1, 100)))
def test_fields_round_trip(nonce: bytes | None, user_data: bytes | None, nonce_spelling: str, data_spelling: str,
                           key: tuple[str, bytes, str, str, int] | None) -> None:
    fields: dict[str, str] = {}
    if nonce is not None:
        fields["nonce"] = _spell(nonce, nonce_spelling)
    if user_data is not None:
        fields["user_data"] = _spell(user_data, data_spelling)
    public_key = None
    if key is not None:
        form, public_key, spelling, label, width = key
        fields["public_key"] = _pem(public_key, label, width) if form == "pem" else _spell(public_key, spelling)
    assert parse_request(json.dumps(fields).encode()) == AttestationRequest(nonce, user_data, public_key)


@given(st.sampled_from(["nonce", "user_data", "public_key"]), st.binary(min_size=1025, max_size=1500), _spelling)
def test_anything_over_1024_bytes_is_a_400_naming_field_and_limit(name: str, data: bytes, spelling: str) -> None:
    error = _refused(_body(**{name: _spell(data, spelling)}))
    assert error.message.startswith(name) and "at most 1024" in error.message


# -- the server, over 127.0.0.1 -------------------------------------------------------------------


class FakeNsm:
    """Records every call; answers DOCUMENT, or raises `error`, or waits for `release` first."""

    def __init__(self, error: Exception | None = None, document: bytes = DOCUMENT) -> None:
        self.calls: list[tuple[bytes | None, bytes | None, bytes | None]] = []
        self.error, self.document = error, document
        self.release: threading.Event | None = None
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def attestation(self, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.release is not None:
                self.release.wait(LIMIT)
            self.calls.append((user_data, nonce, public_key))
            if self.error is not None:
                raise self.error
            return self.document
        finally:
            with self._lock:
                self.running -= 1


class Response:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/1.1 ") else 0
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    @property
    def text(self) -> str:
        return self.body.decode()


def post(body: bytes, path: str = "/v1/attestation", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            out += chunk
    return bytes(out)


async def exchange(port: int, data: bytes, *, half_close: bool = False) -> Response:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        return Response(await asyncio.wait_for(_read_all(reader), LIMIT))
    finally:
        writer.close()


class Api:
    def __init__(self, nsm: FakeNsm, **limits: float) -> None:
        self.nsm = nsm
        self.lines: list[str] = []
        self.api = AttestationApi(nsm, log=self.lines.append, **limits)  # type: ignore[arg-type]
        self.port = 0

    async def ask(self, data: bytes, **kwargs: bool) -> Response:
        return await exchange(self.port, data, **kwargs)

    async def still_serves(self) -> None:
        """After whatever came before, a good request still gets its document."""
        calls = len(self.nsm.calls)
        error, self.nsm.error = self.nsm.error, None
        try:
            answer = await self.ask(post(_body(nonce=_b64(b"again"))))
        finally:
            self.nsm.error = error
        assert answer.status == 200 and answer.body == self.nsm.document
        assert self.nsm.calls[calls:] == [(None, b"again", None)]


def serve(body: Callable[[Api], Awaitable[None]], nsm: FakeNsm | None = None, **limits: float) -> Api:
    server_api = Api(nsm or FakeNsm(), **limits)

    async def main() -> None:
        server = await api.serve(server_api.api, 0)
        server_api.port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.wait_for(body(server_api), 60)
            await server_api.still_serves()
            assert not [line for line in server_api.lines if "internal error, connection closed" in line]
        finally:
            server.close()

    asyncio.run(main())
    return server_api


def test_a_request_gets_the_nsm_document_and_the_nsm_gets_the_decoded_fields() -> None:
    async def body(a: Api) -> None:
        answer = await a.ask(post(_body(nonce=_b64(b"n" * 1024), user_data=_b64(b"u"), public_key=SPKI_PEM, x=1)))
        assert answer.status == 200, answer.raw
        assert answer.headers["content-type"] == "application/cbor"
        assert answer.headers["content-length"] == str(len(DOCUMENT)) and answer.body == DOCUMENT
        assert answer.headers["connection"] == "close"
        answer = await a.ask(post(_body(public_key=_b64(SPKI_DER))))
        assert answer.status == 200 and answer.body == DOCUMENT
        answer = await a.ask(post(b"{}"))
        assert answer.status == 200
        assert a.nsm.calls == [(b"u", b"n" * 1024, SPKI_DER), (None, None, SPKI_DER), (None, None, None)]

    serve(body)


def test_query_strings_and_absolute_form_targets_reach_the_route() -> None:
    async def body(a: Api) -> None:
        assert (await a.ask(post(b"{}", "/v1/attestation?cache=no"))).status == 200
        assert (await a.ask(post(b"{}", "http://127.0.0.1:9000/v1/attestation"))).status == 200
        assert len(a.nsm.calls) == 2

    serve(body)


@pytest.mark.parametrize("path", ["/", "/v1/attestation/", "/v1/Attestation", "/v2/attestation", "/v1/attestation%20",
                                  "*", "http://127.0.0.1/v1"])
def test_other_paths_get_404_with_a_line_that_says_what_is_served(path: str) -> None:
    async def body(a: Api) -> None:
        for method in ("POST", "GET"):
            answer = await a.ask(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode())
            assert answer.status == 404 and answer.text == "not found: the attestation API serves only POST " \
                                                           "/v1/attestation\n", answer.raw
        assert a.nsm.calls == []

    serve(body)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS", "post", "PATCH"])
def test_other_methods_get_405_with_allow_post(method: str) -> None:
    async def body(a: Api) -> None:
        answer = await a.ask(f"{method} /v1/attestation HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert answer.status == 405 and answer.headers["allow"] == "POST"
        assert answer.text == f"{method} is not allowed: /v1/attestation takes POST\n"
        assert a.nsm.calls == []

    serve(body)


def test_a_head_request_gets_405_without_a_body() -> None:
    async def body(a: Api) -> None:
        answer = await a.ask(b"HEAD /v1/attestation HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 405 and answer.headers["allow"] == "POST" and answer.body == b""
        assert int(answer.headers["content-length"]) > 0  # what a GET would have got

    serve(body)


@pytest.mark.parametrize(("fields", "words"), [
    ({"nonce": "not base64!"}, "nonce is not base64"),
    ({"user_data": "AAAA AAAA"}, "user_data is not base64: it has whitespace"),
    ({"public_key": "-----BEGIN PUBLIC KEY-----\nxx\n"}, "public_key is not a PEM block"),
    ({"public_key": _b64(bytes(2000))}, "public_key is 2000 bytes once decoded; the NSM takes at most 1024"),
    ({"nonce": 1}, "nonce must be a base64 string or null"),
])
def test_bad_fields_get_400_naming_the_field(fields: dict[str, object], words: str) -> None:
    async def body(a: Api) -> None:
        answer = await a.ask(post(json.dumps(fields).encode()))
        assert answer.status == 400 and words in answer.text, answer.raw
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        assert a.nsm.calls == []

    serve(body)


def test_a_body_that_is_not_json_gets_400() -> None:
    async def body(a: Api) -> None:
        for data in (b"", b"nonce=abc", b"[1]", b"\xff\xfe"):
            answer = await a.ask(post(data))
            assert answer.status == 400 and answer.text.startswith("the body"), answer.raw

    serve(body)


def test_framing_content_length_required_and_bounded() -> None:
    async def body(a: Api) -> None:
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 411 and "Content-Length" in answer.text
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"2\r\n{}\r\n0\r\n\r\n")
        assert answer.status == 411 and "chunked bodies are not accepted" in answer.text
        # refused from the head alone: the client need not send (and odyn never buffers) the 16 KiB + 1
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nContent-Length: 16385\r\n\r\n")
        assert answer.status == 413 and "at most 16384" in answer.text
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999\r\n\r\n")
        assert answer.status == 413
        answer = await a.ask(post(b" " * 16000 + b"{}" + b" " * 382))  # 16384 bytes exactly
        assert answer.status == 200
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n"
                             b"\r\n{}")
        assert answer.status == 400 and "conflicting Content-Length" in answer.text
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: "
                             b"chunked\r\n\r\n{}")
        assert answer.status == 400 and "ambiguous" in answer.text
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
        assert answer.status == 501

    serve(body)


def test_bytes_after_the_body_are_not_a_second_request() -> None:
    async def body(a: Api) -> None:
        answer = await a.ask(post(b"{}") + post(_body(nonce="AAAA")), half_close=True)
        assert answer.status == 200 and answer.raw.count(b"HTTP/1.1") == 1
        assert a.nsm.calls == [(None, None, None)]

    serve(body)


def test_a_body_shorter_than_its_length_gets_400() -> None:
    async def body(a: Api) -> None:
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}",
                             half_close=True)
        assert answer.status == 400 and answer.text == "the body ended after 2 of its 10 bytes\n"

    serve(body)


def test_bad_and_oversized_heads() -> None:
    async def body(a: Api) -> None:
        assert (await a.ask(b"POST  /v1/attestation HTTP/1.1\r\n\r\n")).status == 400
        assert (await a.ask(b"POST /v1/attestation HTTP/2.0\r\n\r\n")).status == 400
        assert (await a.ask(b"POST /v1/attestation HTTP/1.1\r\nX: a\x00b\r\n\r\n")).status == 400
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n")
        assert answer.status == 431 and answer.text == "request head too large\n"
        many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
        assert (await a.ask(b"POST /v1/attestation HTTP/1.1\r\n" + many + b"\r\n")).status == 431
        garbage = await a.ask(bytes(range(256)) * 8 + b"\r\n\r\n")
        assert garbage.status == 400

    serve(body)


def test_expect_100_continue_is_honoured() -> None:
    async def body(a: Api) -> None:
        payload = _body(nonce=_b64(b"n"))
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        try:
            writer.write(post(payload, extra="Expect: 100-continue\r\n").removesuffix(payload))
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LIMIT)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(payload)
            answer = Response(await asyncio.wait_for(_read_all(reader), LIMIT))
        finally:
            writer.close()
        assert answer.status == 200 and answer.body == DOCUMENT and a.nsm.calls == [(None, b"n", None)]
        # too big: refused before the client sends the body, with no 100 Continue
        answer = await a.ask(b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n"
                             b"Expect: 100-continue\r\n\r\n")
        assert answer.status == 413 and b"100 Continue" not in answer.raw
        answer = await a.ask(post(b"{}", extra="Expect: something-else\r\n"))
        assert answer.status == 417

    serve(body)


def test_slow_clients_get_408_however_they_drip() -> None:
    async def body(a: Api) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        try:
            writer.write(b"POST /v1/attestation HTTP/1.1\r\n")  # and the rest of the head never comes
            assert Response(await asyncio.wait_for(_read_all(reader), LIMIT)).status == 408
        finally:
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        try:
            writer.write(b"POST /v1/attestation HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            got = b""
            async with asyncio.timeout(LIMIT):
                while not got:  # a byte every 20 ms, until the answer: an idle timeout would never fire
                    try:
                        got = await asyncio.wait_for(reader.read(1000), 0.02)
                    except TimeoutError:
                        writer.write(b" ")
            answer = Response(got + await asyncio.wait_for(_read_all(reader), LIMIT))
            assert answer.status == 408 and answer.text == "the request did not arrive within 0.5 s\n"
        finally:
            writer.close()
        assert a.nsm.calls == []

    serve(body, request_timeout=0.5)


def test_a_client_that_leaves_early_costs_nothing() -> None:
    async def body(a: Api) -> None:
        for data in (b"", b"POST /v1/att", post(b"{}").removesuffix(b"{}")):
            _, writer = await asyncio.open_connection("127.0.0.1", a.port)
            writer.write(data)
            writer.close()
        assert await _settles(lambda: a.api.gate.open == 0)

    serve(body)


async def _settles(condition: Callable[[], bool]) -> bool:
    for _ in range(int(LIMIT / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def test_the_nsm_failing_gets_502_with_its_message_and_a_log_line() -> None:
    async def body(a: Api) -> None:
        answer = await a.ask(post(_body(nonce="AAAA")))
        assert answer.status == 502 and answer.text == "the NSM failed: InvalidArgument\n"
        assert a.lines == ["odyn: attestation API: the NSM failed: InvalidArgument"]

    serve(body, FakeNsm(NsmError("InvalidArgument")))


def test_a_broken_nsm_client_gets_500_and_odyn_serves_on() -> None:
    async def body(a: Api) -> None:
        answer = await a.ask(post(b"{}"))
        assert answer.status == 500 and answer.text == "internal error asking the NSM: KeyError: 'document'\n"

    serve(body, FakeNsm(KeyError("document")))


def test_a_hung_nsm_gets_504_and_calls_never_overlap() -> None:
    nsm = FakeNsm()
    nsm.release = threading.Event()

    async def body(a: Api) -> None:
        answers = await asyncio.gather(*(a.ask(post(_body(nonce=_b64(bytes([i]))))) for i in range(3)))
        assert [x.status for x in answers] == [504] * 3
        assert answers[0].text == "the NSM did not answer within 0.3 s\n"
        nsm.release.set()  # the first call ends; the two that waited for their turn were never made
        assert await _settles(lambda: len(nsm.calls) == 1 and not a.api._calls)
        nsm.release = None

    serve(body, nsm, nsm_timeout=0.3)
    assert nsm.most_at_once == 1


def test_the_connection_limit_answers_503_and_lets_in_again() -> None:
    async def body(a: Api) -> None:
        held = [await asyncio.open_connection("127.0.0.1", a.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        answer = await a.ask(post(b"{}"))
        assert answer.status == 503 and "2 connections open, its limit" in answer.text
        assert a.lines == ["odyn: attestation API: connection limit reached (2 open): refusing new connections "
                           "until some end"]
        for _, writer in held:
            writer.close()
        assert await _settles(lambda: a.api.gate.open == 0)

    serve(body, max_connections=2)


def test_it_listens_on_loopback_only_and_says_so_when_it_cannot() -> None:
    async def main() -> None:
        server = await api.serve(AttestationApi(FakeNsm()), 0)
        port = server.sockets[0].getsockname()[1]
        try:
            assert [s.getsockname()[0] for s in server.sockets] == ["127.0.0.1"]
            with pytest.raises(OSError, match=f"the attestation API cannot listen on 127.0.0.1:{port}"):
                await api.serve(AttestationApi(FakeNsm()), port)
        finally:
            server.close()

    asyncio.run(main())


# -- through the supervisor -----------------------------------------------------------------------

APP_ASKS = r"""
import base64, hashlib, http.client, json, sys
port, nonce = int(sys.argv[1]), sys.argv[2].encode()
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
connection.request("POST", "/v1/attestation", json.dumps({"nonce": base64.b64encode(nonce).decode()}),
                   {"Content-Type": "application/json"})
response = connection.getresponse()
document = response.read()
print("api:", response.status, response.getheader("Content-Type"), hashlib.sha256(document).hexdigest(), flush=True)
sys.exit(0 if response.status == 200 else 3)
"""


def _api_manifest(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "cfg"
    config.mkdir()
    path = config / "enclaver.yaml"
    path.write_text(f"version: v1\nname: app\ntarget: t\nsources: {{app: a}}\napi:\n  listen_port: {port}\n")
    (tmp_path / "vsock").mkdir()
    return path


def _supervise(tmp_path: Path, config: Path, app: list[str],
               nsm: Callable[[], api.Attester | None] | None) -> tuple[int, Supervisor, bytes]:
    async def main() -> tuple[int, Supervisor, bytes]:
        supervisor = Supervisor(UnixTransport(tmp_path / "vsock", 16), linger=0, flush=1, nsm=nsm)
        code = await asyncio.wait_for(supervisor.run(app, {"PATH": "/usr/bin:/bin"}, str(config)), 60)
        data, _, _ = supervisor._ring.read(0)
        return code, supervisor, data

    return asyncio.run(main())


def test_an_app_in_the_enclave_gets_its_document_through_odyn(tmp_path: Path) -> None:
    from services import free_port

    port = free_port()
    config = _api_manifest(tmp_path, port)
    nsm = FakeNsm()
    opened: list[FakeNsm] = []

    def factory() -> FakeNsm:
        opened.append(nsm)
        return nsm

    code, supervisor, logs = _supervise(tmp_path, config, [sys.executable, "-c", APP_ASKS, str(port), "app nonce"],
                                        factory)
    assert code == 0, logs
    assert f"odyn: attestation API on 127.0.0.1:{port}\n".encode() in logs
    assert f"api: 200 application/cbor {hashlib.sha256(DOCUMENT).hexdigest()}\n".encode() in logs
    assert nsm.calls == [(None, b"app nonce", None)] and len(opened) == 1
    assert supervisor.status.final and supervisor.status.code == 0


def test_without_api_in_the_manifest_the_nsm_is_never_opened(tmp_path: Path) -> None:
    config = tmp_path / "enclaver.yaml"
    config.write_text("version: v1\nname: app\ntarget: t\nsources: {app: a}\n")
    (tmp_path / "vsock").mkdir()

    def factory() -> None:
        raise AssertionError("opened")

    code, _, logs = _supervise(tmp_path, config, [sys.executable, "-c", "print('fine')"], factory)
    assert code == 0 and b"fine\n" in logs and b"attestation API" not in logs


@pytest.mark.parametrize(("nsm", "why"), [
    (None, "odyn was started without an NSM client"),
    (lambda: None, "there is no /dev/nsm"),
    (lambda: (_ for _ in ()).throw(NsmError("cannot connect to /run/nsm.sock: No such file or directory")),
     "cannot connect to /run/nsm.sock: No such file or directory"),
])
def test_api_without_an_nsm_is_fatal_before_the_app_starts(tmp_path: Path, nsm: Callable[[], None] | None,
                                                           why: str) -> None:
    config = _api_manifest(tmp_path, 9777)
    marker = tmp_path / "app-ran"
    code, supervisor, logs = _supervise(tmp_path, config, [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], nsm)
    assert code == EXIT_FATAL and not marker.exists()
    assert supervisor.status.state == "fatal"
    error = str(supervisor.status.error)
    assert error.startswith("the manifest turns on the attestation API (api.listen_port 9777) but no NSM is "
                            "available: ") and why in error, error
    assert b"odyn: fatal: the manifest turns on the attestation API" in logs


def test_the_nsm_flag() -> None:
    from odyn.__main__ import parse
    from odyn.nsm import NsmClient, NsmError, NsmSocket, open_nsm

    assert parse(["--", "true"]).nsm == "auto"
    assert parse(["--nsm", "unix:/run/nsm.sock", "--", "true"]).nsm == "unix:/run/nsm.sock"
    for bad in ("unix:", "tcp:1.2.3.4", "device:"):
        with pytest.raises(SystemExit) as exit_:
            parse(["--nsm", bad, "--", "true"])
        assert exit_.value.code == 2
    assert open_nsm("none") is None
    client = open_nsm("unix:/nonexistent/nsm.sock")
    assert isinstance(client, NsmClient) and isinstance(client.channel, NsmSocket)
    with pytest.raises(NsmError, match="nonexistent"):
        client.attestation(nonce=b"n")
    device = open_nsm("device:/nonexistent/nsm")
    assert device is not None
    with pytest.raises(NsmError, match="/nonexistent/nsm"):
        device.attestation()
