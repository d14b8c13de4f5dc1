"""The relay itself, over real sockets: byte-exact both ways with backpressure, half-close, data that
arrived before the relay took over, and an idle timeout that counts both directions together."""

from __future__ import annotations

import asyncio
import hashlib
import os

from enclaver_rules.link.relay import splice


async def _pair_through_relay(idle: float, early: bytes = b"") -> tuple[
        tuple[asyncio.StreamReader, asyncio.StreamWriter], tuple[asyncio.StreamReader, asyncio.StreamWriter],
        asyncio.Task[None]]:
    """client ⇄ [relay] ⇄ server, all on 127.0.0.1; returns the client's and the server's ends."""
    server_side: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    relayed: asyncio.Future[asyncio.Task[None]] = asyncio.Future()

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_side.set_result((reader, writer))

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if early:
            await reader.readexactly(1)  # the stream has read more than this: the rest must not be lost
        up = await asyncio.open_connection("127.0.0.1", origin_server.sockets[0].getsockname()[1])
        if early:
            up[1].write(early[:1])
        task = asyncio.ensure_future(splice((reader, writer), up, idle=idle))
        relayed.set_result(task)
        await task

    origin_server = await asyncio.start_server(origin, "127.0.0.1", 0)
    relay_server = await asyncio.start_server(relay, "127.0.0.1", 0)
    client = await asyncio.open_connection("127.0.0.1", relay_server.sockets[0].getsockname()[1])
    if early:
        client[1].write(early)
    return client, await server_side, await relayed


def test_bulk_both_ways_is_byte_exact_with_a_slow_reader() -> None:
    async def main() -> None:
        client, server, task = await _pair_through_relay(idle=30)
        up, down = os.urandom(24 << 20), os.urandom(24 << 20)

        async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
            for i in range(0, len(data), 1 << 20):
                writer.write(data[i:i + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        async def slow_read(reader: asyncio.StreamReader) -> bytes:
            out = bytearray()
            while chunk := await reader.read(1 << 16):
                out += chunk
                if len(out) < (4 << 20):
                    await asyncio.sleep(0.001)  # backpressure: the relay must pause, not buffer everything
            return bytes(out)

        got_up, got_down, *_ = await asyncio.gather(slow_read(server[0]), slow_read(client[0]),
                                                    send(client[1], up), send(server[1], down))
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
        server[1].close()
        client[1].close()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_bytes_read_before_the_takeover_are_passed_on() -> None:
    async def main() -> None:
        client, server, task = await _pair_through_relay(idle=30, early=b"HELLO-early-bytes")
        client[1].write_eof()
        assert await asyncio.wait_for(server[0].read(), 10) == b"HELLO-early-bytes"
        server[1].write(b"bye")
        server[1].write_eof()
        assert await asyncio.wait_for(client[0].read(), 10) == b"bye"  # half-close: the reply still came
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_a_long_one_way_transfer_outlives_the_idle_timeout() -> None:
    """Idle means nothing moved either way: a download with a quiet client is not idle."""
    async def main() -> None:
        client, server, task = await _pair_through_relay(idle=0.3)
        for _ in range(12):  # 1.2 s of trickle, four idle periods long
            server[1].write(b"x" * 100)
            await server[1].drain()
            await asyncio.sleep(0.1)
        server[1].write_eof()
        assert len(await asyncio.wait_for(client[0].read(), 10)) == 1200
        client[1].close()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_a_connection_where_nothing_moves_is_ended() -> None:
    async def main() -> None:
        client, _, task = await _pair_through_relay(idle=0.3)
        await asyncio.wait_for(task, 10)  # ends by itself
        assert await asyncio.wait_for(client[0].read(), 10) == b""

    asyncio.run(main())
