"""Property tests for every codec odyn reads hostile bytes with: the HTTP request head, the body
framers, the egress handshake frame, the status line. Each maps any input to a value or to its
one error type (HeadError, FrameError, ValueError), never to another exception; what it accepts
it re-encodes to something that parses back the same. (The log ring has no decoder: it only
stores and hands out bytes, see test_odyn_protocol.py.)"""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from enclaver_rules.link.frames import FrameDecoder, FrameError, decode_request, decode_result
from enclaver_rules.link.status import Status
from odyn.http_head import (
    ChunkedBody,
    Framing,
    HeadError,
    HeadReader,
    LengthBody,
    Request,
    absolute_target,
    connect_target,
    origin_request,
    parse_head,
    request_framing,
)

# -- the request head ----------------------------------------------------------------------------

NASTY = st.sampled_from([b"\r", b"\n", b"\x00", b"\x1b", b"\x7f", b"\xff", b"\xe9", b" ", b"\t", b":", b",", b"\r\n",
                         b"\r\n ", b"\r\n\t"])
FRAGMENT = st.one_of(st.binary(max_size=12), NASTY, st.sampled_from([b"chunked", b"5", b"0", b"1, 2", b"gzip", b"+5"]))
NASTY_BYTES = st.lists(FRAGMENT, max_size=5).map(b"".join)
GOOD = st.sampled_from  # each part is mostly well-formed, so that the framing rules behind it are reached
METHOD = st.one_of(GOOD([b"GET", b"POST", b"PUT"]), GOOD([b"CONNECT", b"connect", b"G\xffT", b""]), NASTY_BYTES)
TARGET = st.one_of(GOOD([b"http://127.0.0.1/", b"http://example.com:8080/a?b", b"https://[::1]:443/x"]),
                   GOOD([b"example.com:443", b"http://h:" + b"0" * 5000 + b"80/", b"h:" + b"9" * 5000]),
                   NASTY_BYTES.map(lambda b: b"http://h/" + b))
VERSION = st.one_of(GOOD([b"HTTP/1.1", b"HTTP/1.0"]), GOOD([b"HTTP/1.1", b"HTTP/2.0", b"HTTP/1.", b"http/1.1"]),
                    NASTY_BYTES.map(lambda b: b"HTTP/1." + b))
GOOD_NAME = GOOD([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"X-A", b"content-length",
                  b"TRANSFER-ENCODING"])
GOOD_VALUE = GOOD([b"chunked", b"5", b"5, 5", b"1, 2", b"gzip, chunked", b"chunked, chunked", b"content-length",
                   b"x\xe9", b"007", b""])
NAME = st.one_of(GOOD_NAME, NASTY_BYTES)
VALUE = st.one_of(GOOD_VALUE, NASTY_BYTES)
HEADER = st.tuples(NAME, st.sampled_from([b": ", b":", b": ", b" : ", b""]), VALUE).map(b"".join)
ROUGH = st.tuples(METHOD, TARGET, VERSION, st.lists(HEADER, max_size=8)).map(
    lambda p: b" ".join(p[:3]) + b"".join(b"\r\n" + h for h in p[3]) + b"\r\n\r\n")
WELL_FORMED = st.tuples(GOOD([b"GET", b"POST", b"CONNECT"]), GOOD([b"http://127.0.0.1/", b"example.com:443"]),
                        GOOD([b"HTTP/1.1", b"HTTP/1.0"]),
                        st.lists(st.tuples(GOOD_NAME, GOOD_VALUE).map(b": ".join), max_size=4)).map(
    lambda p: b" ".join(p[:3]) + b"".join(b"\r\n" + h for h in p[3]) + b"\r\n\r\n")


def _mutate(head: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    for at, insert in edits:
        at %= len(head) - 3  # not into the final CRLFCRLF
        head = head[:at] + insert + head[at:]
    return head


MUTATED = st.builds(_mutate, WELL_FORMED, st.lists(st.tuples(st.integers(0, 1 << 16), NASTY), min_size=1, max_size=3))
HEAD = st.one_of(WELL_FORMED, MUTATED, ROUGH, st.binary(max_size=300))  # raw bytes: often no end of head


def _feed(data: bytes, cuts: list[int]) -> tuple[HeadReader, Request | None, bytes]:
    """(the reader, the request or None, what was fed)"""
    reader, pos = HeadReader(), 0
    for cut in [*cuts, len(data)]:
        request = reader.feed(data[pos:pos + cut])
        pos += cut
        if request is not None or pos >= len(data):
            return reader, request, data[:pos]
    return reader, None, data


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(HEAD, st.lists(st.integers(1, 40), max_size=8), st.binary(max_size=30))
@example(b"GET http://h/ HTTP/1.\xff\r\n\r\n", [], b"")  # was UnicodeDecodeError
@example(b"GET http://h/ HTTP/1.1\x00\r\n\r\n", [], b"")  # was forwarded into the origin's request line
@example(b"GET http://h:" + b"0" * 5000 + b"80/ HTTP/1.1\r\n\r\n", [], b"")  # was ValueError from int()
@example(b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", [], b"")
def test_any_head_parses_or_gets_a_status_and_what_passes_reparses_the_same(
        head: bytes, cuts: list[int], tail: bytes) -> None:
    try:
        reader, request, fed = _feed(head + tail, cuts)
        assert request is None or reader.rest == fed[fed.find(b"\r\n\r\n") + 4:]  # found in any split
        if request is None:
            return
        framing = request_framing(request)
        target = (connect_target if request.method.upper() == "CONNECT" else absolute_target)(request.target)
    except HeadError as e:
        assert e.status in (400, 431, 501) and e.message
        return
    if target.scheme == "connect":
        return
    forwarded = origin_request(request, target, framing)
    assert forwarded.endswith(b"\r\n\r\n") and forwarded.count(b"\r\n\r\n") == 1
    again = parse_head(forwarded[:-4])  # what the origin gets is well-formed by the same rules
    assert request_framing(again) == framing
    assert all(b"\r" not in line and b"\n" not in line and b"\x00" not in line
               for line in forwarded[:-4].split(b"\r\n"))


@given(st.text(max_size=80) | st.sampled_from(["http://h:" + "0" * 5000 + "1/", "h:" + "0" * 5000 + "1"]))
@example("http://h:\u00b2/")
@example("http://h?x=1")
def test_targets_parse_or_raise_head_error(text: str) -> None:
    for parse in (connect_target, absolute_target):
        try:
            target = parse(text)
            assert 0 < target.port < 65536 and target.host and target.path.startswith("/")
        except HeadError:
            pass


# -- bodies --------------------------------------------------------------------------------------

EXT = st.sampled_from([b"", b";a", b";a=b", b' ; a = "q\\"x"', b";a;b=c"])
TRAILERS = st.lists(st.sampled_from([b"X-T: 1\r\n", b"Y:\r\n", b"Z: a b\xe9\r\n"]), max_size=3).map(b"".join)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    out = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6)):
        size = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(data)
        out += size.encode() + draw(EXT) + b"\r\n" + data + b"\r\n"
    return out + draw(st.sampled_from([b"0", b"000"])) + draw(EXT) + b"\r\n" + draw(TRAILERS) + b"\r\n"


def _run_body(body: ChunkedBody | LengthBody, data: bytes, cuts: list[int]) -> bytes:
    out, pos = b"", 0
    for cut in [*cuts, len(data)]:
        out += body.feed(data[pos:pos + cut])
        pos += cut
        if pos >= len(data):
            break
    return out


@given(chunked_bodies(), st.binary(max_size=40), st.lists(st.integers(1, 30), max_size=12))
def test_a_chunked_body_passes_byte_for_byte_and_nothing_after_it(encoded: bytes, tail: bytes,
                                                                     cuts: list[int]) -> None:
    body = ChunkedBody()
    assert _run_body(body, encoded + tail, cuts) == encoded
    assert body.done and body.discarded == len(tail)


@given(chunked_bodies(), st.binary(max_size=40), st.integers(0, 200), st.binary(min_size=1, max_size=3),
       st.lists(st.integers(1, 30), max_size=12))
@example(b"5\r\nhello\r\n0\r\n\r\n", b"", 4, b"\n", [])  # bare LF after the size
@example(b"5\r\nhello\r\n0\r\n\r\n", b"", 3, b"x", [])  # chunk data longer than its size
@example(b"0\r\n\r\n", b"", 0, b"-", [])
@example(b"ffffffffffffffffff\r\n", b"", 0, b"", [])  # too many hex digits
def test_any_mutation_of_a_chunked_body_passes_a_prefix_or_is_refused(
        encoded: bytes, tail: bytes, at: int, insert: bytes, cuts: list[int]) -> None:
    at = min(at, len(encoded))
    data = encoded[:at] + insert + encoded[at:] + tail
    body, out, pos = ChunkedBody(), b"", 0
    try:
        for cut in [*cuts, len(data)]:
            out += body.feed(data[pos:pos + cut])
            pos += cut
            if pos >= len(data):
                break
    except HeadError as e:
        assert e.status == 400
    assert data.startswith(out)  # never a byte that was not sent, never out of order


@given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=10))
def test_arbitrary_bytes_never_crash_the_chunked_framer(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(HeadError):
        assert data.startswith(_run_body(ChunkedBody(), data, cuts))


@given(st.integers(0, 100), st.binary(max_size=200), st.lists(st.integers(1, 50), max_size=10))
def test_a_length_body_passes_exactly_its_length(length: int, data: bytes, cuts: list[int]) -> None:
    body = Framing("length", length).body()
    assert _run_body(body, data, cuts) == data[:length]
    assert body.discarded == max(0, len(data) - length)


# -- the egress handshake ------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
DOCUMENT = st.one_of(JSON, st.fixed_dictionaries({"host": JSON, "port": JSON}),
                     st.fixed_dictionaries({"Err": st.dictionaries(st.sampled_from(["os_code", "message"]), JSON)}),
                     st.fixed_dictionaries({"Err": st.fixed_dictionaries({"os_code": JSON, "message": JSON})}))


def _frame(payload: bytes) -> bytes:
    return struct.pack("<H", len(payload)) + payload


DEEP = st.integers(900, 30000).flatmap(lambda n: st.sampled_from([b"[" * n, b'{"a":' * (n // 3), b'{"Err":' + b"[" * n]))
HUGE_INT = st.integers(4301, 6000).map(lambda n: b'{"host":"a","port":' + b"9" * n + b"}")


def test_nested_huge_or_undecodable_frames_are_frame_errors() -> None:
    """Found: 60,000 brackets raised RecursionError and 5,000 digits ValueError out of the decoder."""
    for payload in (b"[" * 60000, b'{"a":' * 13000, b"1" * 5000, b'{"host":"a","port":' + b"9" * 5000 + b"}",
                    b'{"Err":{"os_code":' + b"1" * 4400 + b',"message":""}}', b'"\xff"', b"\xff\xfe", b"NaN"):
        try:
            document = FrameDecoder().feed(_frame(payload))
        except FrameError:
            continue
        for decode in (decode_request, decode_result):
            with pytest.raises(FrameError):
                decode(document)


@given(DOCUMENT)
@example({"Err": {"os_code": True, "message": ""}})  # a bool is not an errno
def test_any_json_document_decodes_to_checked_fields_or_is_a_frame_error(document: object) -> None:
    payload = json.dumps(document).encode()
    if len(payload) > 0xFFFF:
        return
    try:
        decoded = FrameDecoder().feed(_frame(payload))
    except FrameError:  # a null document
        assert document is None
        return
    with contextlib.suppress(FrameError):
        request = decode_request(decoded)
        assert type(request.host) is str and type(request.port) is int and 0 < request.port < 65536
    with contextlib.suppress(FrameError):
        result = decode_result(decoded)
        assert type(result.os_code) is int and type(result.message) is str


@given(st.one_of(st.binary(max_size=300), DEEP.map(_frame), HUGE_INT.map(_frame)),
       st.lists(st.integers(1, 4000), max_size=8))
def test_any_bytes_in_any_split_give_a_document_or_a_frame_error(data: bytes, cuts: list[int]) -> None:
    decoder, pos = FrameDecoder(), 0
    try:
        for cut in [*cuts, len(data)]:
            document = decoder.feed(data[pos:pos + cut])
            pos += cut
            if document is not None:
                decode_request(document)
                break
            if pos >= len(data):
                break
    except FrameError:
        pass


# -- status lines --------------------------------------------------------------------------------

STATUS_DOC = st.fixed_dictionaries({"status": st.sampled_from(["starting", "running", "exited", "signaled", "fatal"])},
                                   optional={"code": JSON, "signal": JSON | st.sampled_from(["SIGKILL", "mro",
                                                                                              "__class__", "_value_"]),
                                             "error": JSON, "name": JSON})


@given(STATUS_DOC | JSON)
@example({"status": "signaled", "signal": "mro"})  # was TypeError from int(<method>)
@example({"status": "exited", "code": "3"})  # was TypeError in exit_code()
@example({"status": "exited", "code": 3.5})
@example({"status": ["exited"]})
def test_any_status_document_parses_to_a_usable_status_or_value_error(document: object) -> None:
    try:
        status = Status.parse(json.dumps(document).encode())
    except ValueError:
        return
    assert 0 <= status.exit_code() <= 255
    assert Status.parse(status.line()) == status  # what we accept, we write back the same


def test_nested_huge_or_undecodable_status_lines_are_value_errors() -> None:
    for line in (b"[" * 5000, b'{"status": "exited", "code": [' + b"[" * 5000 + b"]}", b"9" * 5000, b"\xff\xfe",
                 b'{"status": "exited", "code": ' + b"9" * 5000 + b"}", b"", b"null"):
        with pytest.raises(ValueError):
            Status.parse(line)


@given(st.one_of(st.binary(max_size=200), DEEP))
def test_any_bytes_give_a_status_or_a_value_error(line: bytes) -> None:
    with contextlib.suppress(ValueError):
        Status.parse(line)


def test_a_null_frame_is_an_error_not_an_incomplete_frame() -> None:
    """feed() returns None for "not yet": a JSON null frame used to look the same, and a reader
    waited for more bytes that never came."""
    from enclaver_rules.link.frames import FrameDecoder, FrameError

    with pytest.raises(FrameError, match="null"):
        FrameDecoder().feed((4).to_bytes(2, "little") + b"null")
