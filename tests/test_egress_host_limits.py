"""The host side of egress against slow and greedy clients: absolute deadlines, idle tunnels, a limit.

A hostile enclave can drip its request a byte at a time, resolve names whose DNS never answers, open
tunnels and leave them silent, or open connections until the parent runs out of descriptors. Each
test uses short, configured limits and asserts only that the attack *ends* (within a generous guard),
never how fast.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from enclaver_rules.link.frames import ConnectRequest, ConnectResult, FrameDecoder, decode_result, encode_request
from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.policy import EgressPolicy
from enclaver_rules.ports import EGRESS_PORT
from enclaver_rules.runtime.egress_host import HostEgress, Limits

GUARD = 20.0  # seconds: an attack that is not cut by then was not cut at all


def host_side(tmp_path: Path, limits: Limits, resolver: object = None) -> HostEgress:
    async def resolves(name: str, _port: int) -> list[str]:
        return ["127.0.0.1"]

    return HostEgress(EgressPolicy.from_lists(["127.0.0.0/8", "**.example.com"]), UnixTransport(tmp_path, 2),
                      resolver=resolver or resolves, limits=limits)  # type: ignore[arg-type]


async def connect(tmp_path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await UnixTransport(tmp_path, 16).connect(2, EGRESS_PORT)


async def answer(reader: asyncio.StreamReader) -> ConnectResult:
    decoder, document = FrameDecoder(), None
    while document is None:
        chunk = await asyncio.wait_for(reader.read(4096), GUARD)
        if not chunk:
            raise EOFError("closed without an answer")
        document = decoder.feed(chunk)
    return decode_result(document)


async def closed_by_server(reader: asyncio.StreamReader) -> None:
    """Until the host side ends the connection (EOF or reset), reading and dropping what comes."""
    try:
        while await reader.read(4096):
            pass
    except ConnectionError:
        pass


async def silent_origin() -> tuple[asyncio.AbstractServer, int, list[asyncio.StreamWriter]]:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # says nothing; ends when the tunnel does

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], held


# --------------------------------------------------------------------------------------------
# slowloris on the request frame


@pytest.mark.parametrize("how", ["header", "body", "nothing"])
def test_a_dripped_request_is_cut_at_the_handshake_deadline(tmp_path: Path, how: str) -> None:
    """A byte every 50 ms, each well inside any per-read timeout, for longer than the deadline: cut."""
    frame = encode_request(ConnectRequest("a" * 230 + ".example.com", 443))
    # 'header': half a length, then silence; 'body': all but the last byte, one at a time
    data = {"header": frame[:1], "body": frame[:-1], "nothing": b""}[how]

    async def drip(writer: asyncio.StreamWriter) -> None:
        try:
            for byte in data:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass  # cut while dripping
        await asyncio.sleep(GUARD * 2)

    async def main() -> None:
        server = await host_side(tmp_path, Limits(handshake=0.5)).serve()
        reader, writer = await connect(tmp_path)
        dripper = asyncio.ensure_future(drip(writer))
        try:
            await asyncio.wait_for(closed_by_server(reader), GUARD)
        finally:
            dripper.cancel()
            writer.close()
            server.close()

    asyncio.run(main())


def test_a_slow_but_complete_request_within_the_deadline_is_served(tmp_path: Path) -> None:
    async def main() -> None:
        origin, port, _ = await silent_origin()
        server = await host_side(tmp_path, Limits(handshake=10)).serve()
        reader, writer = await connect(tmp_path)
        frame = encode_request(ConnectRequest("127.0.0.1", port))
        for part in (frame[:1], frame[1:5], frame[5:]):
            writer.write(part)
            await asyncio.sleep(0.05)
        assert (await answer(reader)).ok
        writer.close()
        server.close()
        origin.close()

    asyncio.run(main())


@pytest.mark.parametrize("payload", [b"[" * 60000, b"{\"host\":" * 7000, b"\xff\xfe" * 100, b"null", b"[\"host\", 1]"])
def test_a_malformed_request_closes_the_connection_cleanly(tmp_path: Path, payload: bytes,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Deep nesting (RecursionError in json), bad UTF-8, the wrong shape: closed, logged, no traceback."""
    async def main() -> None:
        host = host_side(tmp_path, Limits(handshake=GUARD * 2))
        server = await host.serve()
        reader, writer = await connect(tmp_path)
        writer.write(len(payload).to_bytes(2, "little") + payload)
        await asyncio.wait_for(closed_by_server(reader), GUARD)
        writer.close()
        server.close()
        assert host.open_connections == 0

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "bad request" in caplog.text


# --------------------------------------------------------------------------------------------
# deadlines upstream of the client: resolution


def test_a_resolution_that_never_ends_is_cut(tmp_path: Path) -> None:
    async def never(_name: str, _port: int) -> list[str]:
        await asyncio.Event().wait()
        return []

    async def main() -> None:
        server = await host_side(tmp_path, Limits(resolve=0.3), resolver=never).serve()
        reader, writer = await connect(tmp_path)
        writer.write(encode_request(ConnectRequest("slow.example.com", 443)))
        result = await answer(reader)
        assert not result.ok and "resolving slow.example.com took longer than 0.3 s" in result.message
        writer.close()
        server.close()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# tunnels: an idle timeout, not an absolute one


def test_a_silent_tunnel_is_cut_after_the_idle_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        origin, port, _held = await silent_origin()
        server = await host_side(tmp_path, Limits(idle=0.5)).serve()
        reader, writer = await connect(tmp_path)
        writer.write(encode_request(ConnectRequest("127.0.0.1", port)))
        assert (await answer(reader)).ok
        await asyncio.wait_for(closed_by_server(reader), GUARD)  # neither side said anything: cut
        writer.close()
        server.close()
        origin.close()

    asyncio.run(main())


def test_a_tunnel_that_keeps_moving_outlives_its_idle_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        echoed = bytearray()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(100):
                writer.write(data)

        origin = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        server = await host_side(tmp_path, Limits(idle=1.0)).serve()
        reader, writer = await connect(tmp_path)
        writer.write(encode_request(ConnectRequest("127.0.0.1", port)))
        assert (await answer(reader)).ok
        for _ in range(20):  # 2 s in all, twice the idle timeout, a byte every 0.1 s
            writer.write(b"x")
            echoed += await asyncio.wait_for(reader.read(100), GUARD)
            await asyncio.sleep(0.1)
        assert bytes(echoed) == b"x" * 20
        writer.close()
        server.close()
        origin.close()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# the connection limit


def test_connections_over_the_limit_are_refused_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limit = 3

    async def main() -> None:
        origin, port, _ = await silent_origin()
        host = host_side(tmp_path, Limits(connections=limit, handshake=GUARD * 2))
        server = await host.serve()
        held = [await connect(tmp_path) for _ in range(limit)]  # handshakes that never finish
        held[0][1].write(encode_request(ConnectRequest("127.0.0.1", port)))  # and one open tunnel
        assert (await answer(held[0][0])).ok
        for _ in range(200):
            if host.open_connections == limit:
                break
            await asyncio.sleep(0.01)
        assert host.open_connections == limit
        for _ in range(2):  # the N+1st (and N+2nd): answered at once without being read, and closed
            reader, writer = await connect(tmp_path)
            result = await answer(reader)
            assert not result.ok and result.os_code == errno.EMFILE
            assert f"has {limit} connections open, its limit" in result.message
            await asyncio.wait_for(closed_by_server(reader), GUARD)
            writer.close()
        held[1][1].close()  # one handshake gives up: room for one more
        for _ in range(200):
            if host.open_connections < limit:
                break
            await asyncio.sleep(0.01)
        reader, writer = await connect(tmp_path)
        writer.write(encode_request(ConnectRequest("127.0.0.1", port)))
        assert (await answer(reader)).ok
        for _, w in [*held, (reader, writer)]:
            w.close()
        server.close()
        origin.close()

    with caplog.at_level(logging.WARNING, logger="enclaver.egress-host"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(f"egress (host side): {limit} connections open, the limit (Limits.connections); refusing "
                          "new egress connections until some close") == 1, messages  # once, not per refusal
    assert f"egress (host side): below the limit of {limit} connections again; 2 were refused meanwhile" in messages


def test_the_default_limit_fits_the_descriptor_limit() -> None:
    import resource

    limit = Limits().connections
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert 16 <= limit <= 1024
    assert soft == resource.RLIM_INFINITY or 2 * limit < soft or limit == 16
