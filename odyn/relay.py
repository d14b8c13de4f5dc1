"""Copy bytes both ways between two streams, byte for byte, honouring half-close.

When one side ends its writing (EOF), the other side's write end is shut too, and the copy the
other way goes on until it ends as well: TLS close_notify, HTTP/1.0 and raw protocols all see
exactly what their peer sent. An idle timeout ends connections nobody uses.
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 256 << 10
IDLE_TIMEOUT = 300.0


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float = IDLE_TIMEOUT) -> None:
    try:
        while chunk := await asyncio.wait_for(reader.read(CHUNK), idle):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
            await writer.drain()
    except (TimeoutError, ConnectionError, OSError):
        writer.transport.abort()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter], *, first_to_b: bytes = b"",
                 first_to_a: bytes = b"", idle: float = IDLE_TIMEOUT) -> None:
    """Relay a ⇄ b until both directions have ended; then close both."""
    try:
        if first_to_b:
            b[1].write(first_to_b)
        if first_to_a:
            a[1].write(first_to_a)
        await asyncio.gather(pump(a[0], b[1], idle), pump(b[0], a[1], idle))
    finally:
        for _, writer in (a, b):
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
