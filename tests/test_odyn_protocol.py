"""The sans-IO pieces odyn and the host side share (egress handshake, status lines, log stream), and the log ring."""

from __future__ import annotations

import asyncio
import json
import signal
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclaver_rules.link.frames import (
    ConnectRequest,
    ConnectResult,
    FrameDecoder,
    FrameError,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
)
from enclaver_rules.link.logs import follow
from enclaver_rules.link.status import MAX_LINE, Status
from odyn.logring import LogRing


def test_handshake_bytes_are_upstreams() -> None:
    # 2-byte little-endian length, then compact JSON (compat notes §2)
    payload = b'{"host":"kms.us-east-1.amazonaws.com","port":443}'
    assert encode_request(ConnectRequest("kms.us-east-1.amazonaws.com", 443)) == struct.pack("<H", len(payload)) + payload
    assert encode_result(ConnectResult(True)) == b'\x04\x00"Ok"'
    assert json.loads(encode_result(ConnectResult(False, 111, "refused"))[2:]) == {
        "Err": {"os_code": 111, "message": "refused"}}


@given(st.text(min_size=1, max_size=60).filter(lambda h: len(h.encode()) <= 255), st.integers(1, 65535),
       st.lists(st.integers(1, 8), max_size=12), st.binary(max_size=20))
def test_handshake_round_trips_in_any_split(host: str, port: int, cuts: list[int], tail: bytes) -> None:
    data = encode_request(ConnectRequest(host, port)) + tail
    decoder, result, pos = FrameDecoder(), None, 0
    for cut in [*cuts, len(data)]:
        piece, pos = data[pos:pos + cut], pos + cut
        if result is None:
            result = decoder.feed(piece)
            if result is not None:
                assert decoder.rest + data[pos:] == tail  # bytes after the frame belong to the tunnel
                break
    assert decode_request(result) == ConnectRequest(host, port)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    decoder = FrameDecoder()
    try:
        document = decoder.feed(data)
        if document is not None:
            decode_request(document)
    except FrameError:
        pass


@pytest.mark.parametrize("document", [{"host": "", "port": 1}, {"host": "a", "port": 0}, {"host": "a", "port": 70000},
                                      {"host": "a", "port": True}, {"host": "a"}, ["a", 1], "Ok",
                                      {"host": "a", "port": 1, "extra": 2}, {"host": "x" * 300, "port": 1}])
def test_bad_requests(document: object) -> None:
    with pytest.raises(FrameError):
        decode_request(document)


def test_results() -> None:
    assert decode_result("Ok").ok
    assert decode_result({"Err": {"os_code": 111, "message": "no"}}) == ConnectResult(False, 111, "no")
    with pytest.raises(FrameError):
        decode_result({"Err": "no"})


def test_status_lines_are_valid_json_with_integer_signals() -> None:
    assert Status("running").line() == b'{"status": "running"}\n'
    assert json.loads(Status("exited", code=3).line()) == {"status": "exited", "code": 3}
    signaled = json.loads(Status("signaled", signal=int(signal.SIGTERM)).line())
    assert signaled == {"status": "signaled", "signal": 15, "name": "SIGTERM"}
    fatal = Status("fatal", error='bad "quote"\nand a newline').line()
    assert fatal.count(b"\n") == 1 and json.loads(fatal)["error"] == 'bad "quote"\nand a newline'
    long = Status("fatal", error="é\x00" * 2000).line()
    assert len(long) <= MAX_LINE and json.loads(long)["error"].endswith("…")


def test_status_parse_and_exit_codes() -> None:
    assert Status.parse(b'{ "status": "signaled", "signal": "SIGKILL" }').signal == 9  # upstream's spelling
    assert Status.parse(Status("exited", code=300).line()).exit_code() == 300 & 0xFF
    assert Status("signaled", signal=9).exit_code() == 107 and Status("fatal", error="x").exit_code() == 108
    for bad in (b"nope", b'{"status": "weird"}', b"[]"):
        with pytest.raises(ValueError):
            Status.parse(bad)


def test_log_ring_readers() -> None:
    ring = LogRing(size=10)
    early = ring.reader()
    ring.append(b"hello ")
    data, early, eos = ring.read(early)
    assert (data, eos) == (b"hello ", False)
    ring.append(b"world, and more")
    late = ring.reader()
    assert ring.read(late)[0] == b", and more"  # a new reader gets what the ring still holds
    data, early, _ = ring.read(early)
    # 21 bytes written into a 10-byte ring: 11 dropped, of which this reader had read 6
    assert data.startswith(b"\n[odyn: 5 bytes of log dropped") and data.endswith(b", and more")
    ring.close()
    assert ring.read(early) == (b"", early, True)  # everything read, log closed: end of stream
    with pytest.raises(ValueError):
        ring.append(b"late")


@given(st.lists(st.binary(max_size=50), max_size=30), st.integers(1, 64))
def test_a_reader_that_keeps_up_sees_every_byte_in_order(chunks: list[bytes], size: int) -> None:
    ring, seen = LogRing(size=max(size, 50)), b""
    position = ring.reader()
    for chunk in chunks:
        ring.append(chunk)
        data, position, _ = ring.read(position, limit=1 << 20)
        seen += data
    assert seen == b"".join(chunks)


def test_the_log_stream_is_followed_to_its_half_close() -> None:
    """What odyn's log server sends (the ring's bytes, then end-of-stream) reaches the host's sink
    unchanged, in chunks of at most `chunk`, and `follow` returns at the end."""
    ring = LogRing(size=64)
    ring.append(b"line one\nhalf a li")
    ring.append(b"ne\n")
    ring.close()

    async def host_side() -> list[bytes]:
        reader = asyncio.StreamReader()
        data, _, end = ring.read(ring.reader())
        reader.feed_data(data)
        assert end
        reader.feed_eof()  # odyn's write_eof
        chunks: list[bytes] = []
        await asyncio.wait_for(follow(reader, chunks.append, chunk=8), 5)
        return chunks

    chunks = asyncio.run(host_side())
    assert b"".join(chunks) == b"line one\nhalf a line\n" and max(map(len, chunks)) <= 8
