"""odyn's proxy and ingress relay against hostile clients, over real sockets on 127.0.0.1 and the Unix
transport: slowloris (absolute deadlines for heads and handshakes, idle cut for tunnels), too many
connections (a limit and a log line), request smuggling (strict RFC 9112 framing, bodies forwarded
exactly as framed), header injection, non-ASCII and oversized input, a host side or an origin that
misbehaves. Deadlines are set small here; the tests assert outcomes, never how fast they came.

The host side is a small stand-in (the real one, `HostEgress`, is tested in test_egress_proxy.py)
whose misbehaviour each test chooses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from enclaver_rules.link.frames import ConnectResult, FrameDecoder, decode_request, encode_result
from enclaver_rules.link.relay import splice
from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.policy import EgressPolicy
from enclaver_rules.ports import EGRESS_PORT
from odyn import ingress
from odyn.egress import EgressProxy

LIMIT = 20.0  # seconds any single wait in these tests may take before it counts as a hang


class Origin:
    """A TCP origin on 127.0.0.1 that records every byte it gets until EOF, then answers `ok`."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = bytearray()
        self.arrived = asyncio.Event()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while chunk := await reader.read(65536):
                self.received += chunk
                self.arrived.set()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            outcome = "eof"
        except ConnectionError:
            outcome = "reset"
        if not self.ended.done():
            self.ended.set_result(outcome)
        writer.close()


class Stack:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[asyncio.AbstractServer] = []
        self.lines: list[str] = []

    async def origin(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                     **kwargs: object) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def host(self, behaviour: str = "relay", inject: bytes = b"") -> None:
        """The host side of egress: `relay` (answer Ok, connect, relay), `silent` (never answer),
        `drip` (announce a long answer, then send it a byte at a time, without end)."""
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            decoder, document = FrameDecoder(), None
            while document is None:
                chunk = await reader.read(4096)
                if not chunk:
                    return
                document = decoder.feed(chunk)
            request = decode_request(document)
            try:
                if behaviour == "silent":
                    await reader.read()
                    return
                if behaviour == "drip":
                    writer.write(b"\xff\xff")
                    while True:
                        writer.write(b" ")
                        await writer.drain()
                        await asyncio.sleep(0.02)
                upstream = await asyncio.open_connection("127.0.0.1", request.port)
                writer.write(encode_result(ConnectResult(True)) + inject)
                await splice((reader, writer), upstream)
            except ConnectionError:
                pass
            finally:
                writer.close()

        self.servers.append(await UnixTransport(self.tmp_path, 2).listen(EGRESS_PORT, handle))

    async def proxy(self, **kwargs: object) -> tuple[int, EgressProxy]:
        proxy = EgressProxy(EgressPolicy.from_lists(["127.0.0.1"]), UnixTransport(self.tmp_path, 16),
                            log=self.lines.append, **kwargs)  # type: ignore[arg-type]
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1]), proxy

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def internal_errors(self) -> list[str]:
        return [line for line in self.lines if "internal error" in line]


def run(tmp_path: Path, body: Callable[[Stack], Awaitable[None]]) -> None:
    async def main() -> None:
        stack = Stack(tmp_path)
        try:
            await asyncio.wait_for(body(stack), 60)
            assert stack.internal_errors() == []
        finally:
            stack.close()

    asyncio.run(main())


async def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(_read_all(reader), LIMIT)
    finally:
        writer.close()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            out += chunk
    return bytes(out)


async def drip(port: int, data: bytes, interval: float = 0.02) -> tuple[bytes, int]:
    """Send `data` a byte at a time while reading; stop when the proxy has answered and closed.
    Returns (the answer, how many bytes went out)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(_read_all(reader))
    sent = 0
    try:
        for byte in data:
            if answer.done():
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            sent += 1
            await asyncio.sleep(interval)
        return await asyncio.wait_for(answer, LIMIT), sent
    finally:
        writer.close()


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(LIMIT):
        while not condition():
            await asyncio.sleep(0.01)


# -- slowloris -----------------------------------------------------------------------------------

def test_a_head_dripped_a_byte_at_a_time_is_cut_at_the_absolute_deadline(tmp_path: Path) -> None:
    """Every byte arrives well within any per-read timeout; the head as a whole never does."""
    async def body(stack: Stack) -> None:
        port, _ = await stack.proxy(head_timeout=0.5)
        endless = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nX-Drip: " + b"a" * 2000
        answer, sent = await drip(port, endless)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"within 0.5 s" in answer
        assert sent < len(endless)  # the proxy ended it, not the client

    run(tmp_path, body)


def test_a_head_that_stops_halfway_is_cut(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        port, _ = await stack.proxy(head_timeout=0.3)
        answer = await exchange(port, b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n", half_close=False)
        assert answer.startswith(b"HTTP/1.1 408")

    run(tmp_path, body)


@pytest.mark.parametrize("behaviour", ["silent", "drip"])
def test_a_host_side_that_stalls_the_handshake_is_cut_at_the_deadline(tmp_path: Path, behaviour: str) -> None:
    async def body(stack: Stack) -> None:
        await stack.host(behaviour)
        port, _ = await stack.proxy(handshake_timeout=0.5)
        answer = await exchange(port, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n", half_close=False)
        assert answer.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n") and b"within 0.5 s" in answer

    run(tmp_path, body)


def test_a_tls_origin_that_never_finishes_its_handshake_is_cut(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # takes the ClientHello, never answers
            writer.close()

        origin = await stack.origin(mute)
        await stack.host()
        port, _ = await stack.proxy(handshake_timeout=0.5)
        answer = await exchange(port, f"GET https://127.0.0.1:{origin}/ HTTP/1.1\r\n\r\n".encode(), half_close=False)
        assert answer.startswith(b"HTTP/1.1 504")

    run(tmp_path, body)


def test_an_idle_connect_tunnel_is_cut(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        async def holds(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        origin = await stack.origin(holds)
        await stack.host()
        port, _ = await stack.proxy(idle_timeout=0.3)
        answer = await exchange(port, f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\n\r\n".encode(), half_close=False)
        assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"  # then closed: nothing moved

    run(tmp_path, body)


def test_an_idle_ingress_connection_is_cut(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        async def holds(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        app_port = await stack.origin(holds)
        stack.servers.append(await ingress.serve(UnixTransport(stack.tmp_path, 16), app_port, idle=0.3))
        reader, writer = await asyncio.open_unix_connection(str(stack.tmp_path / f"16.{app_port}.sock"))
        assert await asyncio.wait_for(_read_all(reader), LIMIT) == b""
        writer.close()

    run(tmp_path, body)


# -- connection limits ---------------------------------------------------------------------------

def test_the_proxy_refuses_one_connection_over_its_limit_and_says_so(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        port, proxy = await stack.proxy(max_connections=3)
        holders = []
        for _ in range(3):
            holder = await asyncio.open_connection("127.0.0.1", port)
            holder[1].write(b"GET http://127.0.0.1")  # a head that has not ended: the slot is held
            holders.append(holder)
        await eventually(lambda: proxy.gate.open == 3)
        for _ in range(2):
            answer = await exchange(port, b"")
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert b"3 connections open, its limit" in answer
        limit_lines = [line for line in stack.lines if "connection limit" in line]
        assert limit_lines == ["odyn: egress proxy: connection limit reached (3 open): refusing new connections "
                               "until some end"]  # once, not once per refusal
        holders[0][1].close()
        await eventually(lambda: proxy.gate.open == 2)
        answer = await exchange(port, b"GET http://denied.example/ HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403")  # served again
        for _, writer in holders[1:]:
            writer.close()

    run(tmp_path, body)


def test_ingress_refuses_one_connection_over_its_limit_and_says_so(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while line := await reader.readline():
                    writer.write(line)
            writer.close()

        app_port = await stack.origin(echo)
        path = str(stack.tmp_path / f"16.{app_port}.sock")
        stack.servers.append(await ingress.serve(UnixTransport(stack.tmp_path, 16), app_port, limit=2,
                                                 log=stack.lines.append))

        async def client() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_unix_connection(path)

        async def echoes(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
            conn[1].write(b"ping\n")
            with contextlib.suppress(ConnectionError):
                return await asyncio.wait_for(conn[0].readline(), LIMIT) == b"ping\n"
            return False

        first, second = await client(), await client()
        assert await echoes(first) and await echoes(second)
        third = await client()
        assert not await echoes(third)  # closed at once
        assert f"odyn: ingress port {app_port}: connection limit reached (2 open): refusing new connections " \
               "until some end" in stack.lines
        first[1].close()
        async with asyncio.timeout(LIMIT):
            while not await echoes(fourth := await client()):  # once the first has ended, there is room
                fourth[1].close()
                await asyncio.sleep(0.05)
        for conn in (second, third, fourth):
            conn[1].close()

    run(tmp_path, body)


# -- request framing (RFC 9112) ------------------------------------------------------------------

BAD_HEADS = {
    "TE and CL": (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400, b"ambiguous"),
    "CL then TE": (b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", 400, b"ambiguous"),
    "TE twice chunked": (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400, b"chunked, once"),
    "TE chunked not last": (b"Transfer-Encoding: chunked, gzip\r\n", 400, b"chunked, once"),
    "TE another coding": (b"Transfer-Encoding: gzip, chunked\r\n", 501, b"only the chunked"),
    "TE empty": (b"Transfer-Encoding: \r\n", 400, b"chunked, once"),
    "two different CL": (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400, b"conflicting"),
    "CL list": (b"Content-Length: 1, 2\r\n", 400, b"conflicting"),
    "CL plus sign": (b"Content-Length: +5\r\n", 400, b"decimal digits"),
    "CL negative": (b"Content-Length: -1\r\n", 400, b"decimal digits"),
    "CL hex": (b"Content-Length: 0x5\r\n", 400, b"decimal digits"),
    "CL two numbers": (b"Content-Length: 5 5\r\n", 400, b"decimal digits"),
    "CL empty": (b"Content-Length: \r\n", 400, b"decimal digits"),
    "CL superscript": (b"Content-Length: \xb2\r\n", 400, b"decimal digits"),
    "CL huge": (b"Content-Length: " + b"9" * 40 + b"\r\n", 400, b"decimal digits"),
    "obs-fold": (b"X-A: one\r\n two\r\n", 400, b"obsolete line folding"),
    "obs-fold tab": (b"X-A: one\r\n\tContent-Length: 5\r\n", 400, b"obsolete line folding"),
    "bare CR": (b"X-A: one\rX-B: two\r\n", 400, b"control character"),
    "bare LF": (b"X-A: one\nContent-Length: 5\r\n", 400, b"control character"),
    "NUL": (b"X-A: one\x00two\r\n", 400, b"control character"),
    "other CTL": (b"X-A: one\x1btwo\r\n", 400, b"control character"),
}


@pytest.mark.parametrize("name", BAD_HEADS)
def test_ambiguous_or_malformed_requests_get_a_clean_answer_and_never_reach_the_origin(
        tmp_path: Path, name: str) -> None:
    headers, status, why = BAD_HEADS[name]

    async def body(stack: Stack) -> None:
        origin = Origin()
        origin_port = await stack.origin(origin)
        await stack.host()
        port, _ = await stack.proxy()
        request = (f"POST http://127.0.0.1:{origin_port}/ HTTP/1.1\r\n".encode() + headers
                   + b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await exchange(port, request)
        assert answer.split(b"\r\n")[0].startswith(f"HTTP/1.1 {status} ".encode()), answer
        assert b"Connection: close\r\n" in answer and why in answer
        assert origin.connections == 0

    run(tmp_path, body)


BAD_LINES = {  # (request, status); {port} is the origin's
    "version not ASCII": (b"GET http://127.0.0.1:{port}/ HTTP/1.\xff\r\n\r\n", 400),
    "version with NUL": (b"GET http://127.0.0.1:{port}/ HTTP/1.1\x00\r\n\r\n", 400),
    "version with CR": (b"GET http://127.0.0.1:{port}/ HTTP/1.1\rX-Injected:1\r\n\r\n", 400),
    "version 2": (b"GET http://127.0.0.1:{port}/ HTTP/1.2\r\n\r\n", 400),
    "target not ASCII": (b"GET http://127.0.0.1:{port}/\xe9 HTTP/1.1\r\n\r\n", 400),
    "target with NUL": (b"GET http://127.0.0.1:{port}/\x00 HTTP/1.1\r\n\r\n", 400),
    "target with tab": (b"GET http://127.0.0.1:{port}/\tx HTTP/1.1\r\n\r\n", 400),
    "header name not ASCII": (b"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nX-\xff: 1\r\n\r\n", 400),
    "space before colon": (b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello", 400),
    "port of 5000 digits": (b"GET http://127.0.0.1:" + b"0" * 5000 + b"{port}/ HTTP/1.1\r\n\r\n", 400),
    "CONNECT port of 5000 digits": (b"CONNECT 127.0.0.1:" + b"0" * 5000 + b"{port} HTTP/1.1\r\n\r\n", 400),
    "CONNECT with a body": (b"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody", 400),
    "CONNECT chunked": (b"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "TE in HTTP/1.0": (b"POST http://127.0.0.1:{port}/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "bad first chunk": (b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "chunk size, bare LF": (b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello", 400),
    "1 MiB of head": (b"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n" + b"X-Long: " + b"a" * (1 << 20) + b"\r\n\r\n", 431),
    "10,000 headers": (b"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n" + b"A: b\r\n" * 10000 + b"\r\n", 431),
}


def test_malformed_input_of_every_kind_gets_a_clean_answer_and_no_traceback(tmp_path: Path) -> None:
    """Non-ASCII, control characters, absurd numbers and sizes: each a 4xx answer and a clean close,
    and nothing reaches the origin. (Before: a UnicodeDecodeError or a ValueError from int() killed
    the handler with a traceback and no answer, or the bytes were forwarded.)"""
    async def body(stack: Stack) -> None:
        origin = Origin()
        origin_port = await stack.origin(origin)
        await stack.host()
        port, _ = await stack.proxy()
        wrong = {}
        for name, (request, status) in BAD_LINES.items():
            answer = await exchange(port, request.replace(b"{port}", str(origin_port).encode()))
            if not answer.startswith(f"HTTP/1.1 {status} ".encode()):
                wrong[name] = answer[:60]
        assert wrong == {}
        assert origin.connections == 0

    run(tmp_path, body)


async def forwarded(stack: Stack, request: bytes) -> tuple[bytes, bytes]:
    """(what the origin got, what the client got) for one request sent through the proxy."""
    origin = Origin()
    origin_port = await stack.origin(origin)
    await stack.host()
    port, _ = await stack.proxy()
    answer = await exchange(port, request.replace(b"{port}", str(origin_port).encode()))
    return bytes(origin.received), answer


def test_a_content_length_body_is_forwarded_exactly_and_what_follows_is_not(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        got, answer = await forwarded(stack, b"POST http://127.0.0.1:{port}/up HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
                                             b"helloGET /smuggled HTTP/1.1\r\nHost: internal\r\n\r\n")
        assert answer.endswith(b"\r\n\r\nok")
        head, _, rest = got.partition(b"\r\n\r\n")
        assert b"\r\nContent-Length: 5\r\n" in head + b"\r\n" and rest == b"hello"

    run(tmp_path, body)


def test_a_chunked_body_keeps_its_framing_header_and_ends_at_its_last_chunk(tmp_path: Path) -> None:
    """Before: Transfer-Encoding was dropped as hop-by-hop and the raw chunked body forwarded with
    no framing, so the origin read the body's bytes as the next request."""
    async def body(stack: Stack) -> None:
        chunked = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
        got, _ = await forwarded(stack, b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                        + chunked + b"GET /smuggled HTTP/1.1\r\nHost: internal\r\n\r\n")
        head, _, rest = got.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines.count(b"Transfer-Encoding: chunked") == 1
        assert not any(line.lower().startswith(b"content-length") for line in lines)
        assert rest == chunked

    run(tmp_path, body)


def test_connection_cannot_nominate_the_framing_headers_away(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        got, _ = await forwarded(stack, b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nContent-Length: 5\r\n"
                                        b"Connection: content-length, transfer-encoding, host\r\n\r\nhelloGET / HTTP/1.1")
        head, _, rest = got.partition(b"\r\n\r\n")
        assert b"\r\nContent-Length: 5\r\n" in head + b"\r\n" and rest == b"hello"
        assert b"\r\nHost: 127.0.0.1:" in head

    run(tmp_path, body)


def test_identical_content_lengths_become_one(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        got, _ = await forwarded(stack, b"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nContent-Length: 3, 3\r\n"
                                        b"Content-Length: 003\r\n\r\nabcdef")
        head, _, rest = got.partition(b"\r\n\r\n")
        assert head.count(b"Content-Length") == 1 and b"\r\nContent-Length: 3" in head and rest == b"abc"

    run(tmp_path, body)


def test_a_request_without_a_body_passes_nothing_after_its_head(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        got, _ = await forwarded(stack, b"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nX-Latin: caf\xe9\r\n\r\n"
                                        b"GET http://127.0.0.1:{port}/second HTTP/1.1\r\n\r\n")
        assert got.endswith(b"\r\nX-Latin: caf\xe9\r\nConnection: close\r\n\r\n")  # obs-text passes byte for byte
        assert b"second" not in got

    run(tmp_path, body)


def test_a_chunked_body_that_goes_bad_midway_closes_both_sides_with_a_line(tmp_path: Path) -> None:
    async def body(stack: Stack) -> None:
        origin = Origin()
        origin_port = await stack.origin(origin)
        await stack.host()
        port, _ = await stack.proxy()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST http://127.0.0.1:{origin_port}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                     + b"5\r\nhello\r\n")
        await asyncio.wait_for(origin.arrived.wait(), LIMIT)
        await eventually(lambda: origin.received.endswith(b"hello\r\n"))
        writer.write(b"5\r\nhello, and more than five\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
        assert b"smuggled" not in await asyncio.wait_for(_read_all(reader), LIMIT)
        await asyncio.wait_for(origin.ended, LIMIT)  # closed (through the stand-in host side: EOF or reset)
        assert origin.received.endswith(b"\r\n\r\n5\r\nhello\r\n")  # the good chunk, nothing of the bad one
        assert any("broke its framing (chunked body: chunk data longer than its size)" in line
                   for line in stack.lines), stack.lines
        writer.close()

    run(tmp_path, body)


def test_plaintext_before_tls_never_reaches_the_app_as_the_origins_answer(tmp_path: Path) -> None:
    """For an https:// URL the proxy speaks TLS to the origin; bytes that come before the handshake
    (from anything on the path) are not the origin's, and must not be passed off as its answer."""
    from test_egress_proxy import _tls_origin

    server_ctx, client_ctx = _tls_origin(tmp_path)

    async def body(stack: Stack) -> None:
        origin = Origin()
        origin_port = await stack.origin(origin, ssl=server_ctx)
        await stack.host(inject=b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected")
        port, _ = await stack.proxy(ssl_context=client_ctx)
        answer = await exchange(port, f"GET https://127.0.0.1:{origin_port}/ HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"before the TLS handshake" in answer
        assert b"injected" not in answer

    run(tmp_path, body)
