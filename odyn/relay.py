"""Copy bytes both ways between two streams, byte for byte, honouring half-close.

When one side ends its writing (EOF), the other side's write end is shut too, and the copy the
other way goes on until it ends as well: TLS close_notify, HTTP/1.0 and raw protocols all see
exactly what their peer sent. An idle timeout ends connections nobody uses.

The direction *out of the app* is marked: once it has ended, odyn waits until the peer's kernel
has taken every byte (SIOCOUTQ reaches 0 where the socket family reports it) and then marks the
connection settled, which is what shutdown waits for (see `connections`).
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import time
from typing import Literal

from odyn.connections import settled

CHUNK = 256 << 10
IDLE_TIMEOUT = 300.0
CLOSE_TIMEOUT = 10.0
SIOCOUTQ = 0x5411  # bytes the peer has not yet taken (TCP: unacked too; Unix: unread)


def unsent(writer: asyncio.StreamWriter) -> int | None:
    """Bytes still queued towards the peer, in our buffer and in the kernel; None if unknown."""
    queued = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if sock is None:
        return queued or None
    try:
        kernel: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):  # the family does not say (older AF_VSOCK), or closed
        return queued or None
    return queued + kernel


async def _settle(writer: asyncio.StreamWriter, limit: float) -> None:
    deadline = time.monotonic() + limit
    while unsent(writer) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    settled()


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float = IDLE_TIMEOUT,
               outward: bool = False) -> None:
    try:
        while chunk := await asyncio.wait_for(reader.read(CHUNK), idle):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
            await writer.drain()
        if outward:
            await _settle(writer, idle)
    except (TimeoutError, ConnectionError, OSError):
        writer.transport.abort()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def splice(a: Stream, b: Stream, *, first_to_b: bytes = b"", first_to_a: bytes = b"",
                 idle: float = IDLE_TIMEOUT, app: Literal["a", "b"] | None = None) -> None:
    """Relay a ⇄ b until both directions have ended; then close both. `app` names the side that is
    the app, whose outgoing direction settles the connection."""
    try:
        if first_to_b:
            b[1].write(first_to_b)
        if first_to_a:
            a[1].write(first_to_a)
        await asyncio.gather(pump(a[0], b[1], idle, outward=app == "a"), pump(b[0], a[1], idle, outward=app == "b"))
    except asyncio.CancelledError:  # shut down (flush bound over): drop what a peer never took
        for _, writer in (a, b):
            writer.transport.abort()
        raise
    finally:
        for _, writer in (a, b):
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
            except (TimeoutError, ConnectionError, OSError):
                writer.transport.abort()  # a peer that stopped reading must not hold us forever
