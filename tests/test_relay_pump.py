"""The relay's splice pumps (`enclaver_rules.link.pump`): plain sockets go through them, and what the
relay promised still holds with them, without them (over the limit) and when splice is refused
(before any byte moved, or with bytes already in the pipe): byte-exact both ways, half-close,
backpressure that stops reading instead of buffering, a peer that resets, and no descriptor left over."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from enclaver_rules.link import pump
from enclaver_rules.link.relay import splice

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _through_relay(idle: float = 30, unix: str = "") -> tuple[Stream, Stream, asyncio.Task[None]]:
    """client ⇄ [relay] ⇄ server, over TCP on 127.0.0.1, or with the client on the Unix socket `unix`."""
    server_side: asyncio.Future[Stream] = asyncio.Future()
    relayed: asyncio.Future[asyncio.Task[None]] = asyncio.Future()

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_side.set_result((reader, writer))

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = await asyncio.open_connection("127.0.0.1", origin_server.sockets[0].getsockname()[1])
        task = asyncio.ensure_future(splice((reader, writer), up, idle=idle))
        relayed.set_result(task)
        await task

    origin_server = await asyncio.start_server(origin, "127.0.0.1", 0)
    if unix:
        await asyncio.start_unix_server(relay, unix)
        client = await asyncio.open_unix_connection(unix)
    else:
        relay_server = await asyncio.start_server(relay, "127.0.0.1", 0)
        client = await asyncio.open_connection("127.0.0.1", relay_server.sockets[0].getsockname()[1])
    return client, await server_side, await relayed


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(0, len(data), 1 << 20):
        writer.write(data[i:i + (1 << 20)])
        await writer.drain()
    writer.write_eof()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while chunk := await reader.read(1 << 16):
        out += chunk
        if len(out) < (2 << 20):
            await asyncio.sleep(0.001)  # a slow start: the pump must wait, not spin or buffer
    return bytes(out)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def _both_ways(size: int = 8 << 20, unix: str = "") -> int:
    """Bulk both ways with half-close in between; returns how many pumps were open mid-transfer."""
    client, server, task = await _through_relay(unix=unix)
    await asyncio.sleep(0)
    pumps = pump._open[0]
    up, down = os.urandom(size), os.urandom(size)
    got_up, got_down, *_ = await asyncio.gather(_read_all(server[0]), _read_all(client[0]),
                                                _send(client[1], up), _send(server[1], down))
    assert _digest(got_up) == _digest(up)
    assert _digest(got_down) == _digest(down)
    await asyncio.wait_for(task, 10)  # both ended: the relay closed both sides itself
    assert pump._open[0] == 0  # every pipe closed
    client[1].close()
    server[1].close()
    return pumps


def test_plain_sockets_are_pumped_both_ways() -> None:
    assert asyncio.run(_both_ways()) == 2


def test_a_unix_source_is_copied_a_tcp_one_spliced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[pump.Pump] = []
    real = pump.Pump

    def recording(*args: Any, **kwargs: Any) -> pump.Pump:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pump, "Pump", recording)
    assert asyncio.run(_both_ways(unix=str(tmp_path / "relay.sock"))) == 2
    assert sorted(p.copy for p in made) == [False, True]  # (ingress: app → client spliced, the other copied)


def test_over_the_limit_the_transports_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pump, "MAX_PUMPS", 1)
    assert asyncio.run(_both_ways()) == 1  # one direction pumped, the other copied: both exact
    monkeypatch.setattr(pump, "MAX_PUMPS", 0)
    assert asyncio.run(_both_ways()) == 0


def _refusing(after: Callable[[int, int], bool]) -> Callable[..., int]:
    """os.splice that fails with EINVAL once `after(src, dst)` says so (an old kernel's socket family)."""
    real = os.splice

    def fake(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        if after(src, dst):
            raise OSError(errno.EINVAL, "splice refused")
        return real(src, dst, count, *args, **kwargs)

    return fake


def test_splice_refused_at_once_gives_the_direction_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pump.os, "splice", _refusing(lambda src, dst: True))
    asyncio.run(_both_ways())


def test_splice_refused_with_bytes_in_the_pipe_loses_none(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]

    def out_of_the_pipe_fails_later(src: int, dst: int) -> bool:
        calls[0] += 1
        return calls[0] > 40 and os.path.basename(os.readlink(f"/proc/self/fd/{src}")).startswith("pipe:")

    monkeypatch.setattr(pump.os, "splice", _refusing(out_of_the_pipe_fails_later))
    asyncio.run(_both_ways())


@pytest.mark.parametrize("unix", [False, True], ids=["spliced", "copied"])
def test_a_reader_that_stalls_stops_the_pump_reading(unix: bool, tmp_path: Path) -> None:
    async def main() -> None:
        client, server, task = await _through_relay(unix=str(tmp_path / "relay.sock") if unix else "")
        client[1].write(os.urandom(64 << 20))  # far more than the pipe and both kernels hold
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client[1].drain(), 1.0)  # the server reads nothing
        pumps = [p for p in _pumps(task)]
        assert any(p.writing and not p.reading and p.pending <= p.size for p in pumps)
        got = 0
        while got < (64 << 20):  # and once it reads, everything comes
            got += len(await asyncio.wait_for(server[0].read(1 << 20), 10))
        client[1].close()
        server[1].close()
        await asyncio.wait_for(task, 10)
        assert pump._open[0] == 0

    asyncio.run(main())


def _pumps(task: asyncio.Task[None]) -> list[pump.Pump]:
    """The pumps a relay task holds (found through the event loop's registered callbacks)."""
    loop = asyncio.get_running_loop()
    found = []
    for key in loop._selector.get_map().values():  # type: ignore[attr-defined]
        for handle in key.data:
            owner = getattr(getattr(handle, "_callback", None), "__self__", None)
            if isinstance(owner, pump.Pump):
                found.append(owner)
    return found


@pytest.mark.parametrize("unix", [False, True], ids=["spliced", "copied"])
def test_a_peer_that_resets_mid_transfer_ends_both_sides(unix: bool, tmp_path: Path) -> None:
    async def main() -> None:
        client, server, task = await _through_relay(unix=str(tmp_path / "relay.sock") if unix else "")
        client[1].write(os.urandom(16 << 20))
        await server[0].readexactly(1 << 20)
        server[1].transport.abort()  # hostile: gone mid-stream, unread bytes in its buffer (RST)
        await asyncio.wait_for(task, 10)
        with contextlib.suppress(ConnectionError):  # the client's side ended too: EOF, a reset or EPIPE
            assert await asyncio.wait_for(client[0].read(), 10) == b""  # (it had sent bytes nobody read)
        client[1].close()
        assert pump._open[0] == 0

    asyncio.run(main())


def test_many_connections_leave_no_descriptor_behind() -> None:
    async def main() -> None:
        before = _pipes()
        for _ in range(20):
            client, server, task = await _through_relay()
            client[1].write(b"ping")
            client[1].write_eof()
            assert await server[0].read() == b"ping"
            server[1].write(b"pong")
            server[1].write_eof()
            assert await client[0].read() == b"pong"
            await asyncio.wait_for(task, 10)
            client[1].close()
            server[1].close()
        await asyncio.sleep(0.05)
        assert pump._open[0] == 0
        assert _pipes() == before

    asyncio.run(main())


def _pipes() -> int:
    """Pipe descriptors this process holds (the pumps' and the event loop's own self-pipe, if any)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
    return count
