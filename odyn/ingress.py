"""Ingress: each `ingress[].listen_port` is accepted on the transport (vsock port = listen_port) and
relayed byte for byte, half-close aware, to 127.0.0.1:listen_port where the app listens. TLS, mTLS
and raw TCP (Vault's cluster port) pass untouched.

Whoever reaches ingress is a hostile client. odyn does not speak the app's protocol, so the app's
server keeps its own handshake and request deadlines (it sees every connection); odyn bounds what
it can: at most `limit` connections per port at once (one over is closed at once, and a log line
says so), the connect to the app within `connect_timeout`, and a connection on which nothing moved
either way for `idle` seconds is ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from enclaver_rules.link.relay import IDLE_TIMEOUT, splice
from enclaver_rules.link.transport import Handler, Transport
from odyn.connections import MAX_CONNECTIONS, Gate, Log

CONNECT_TIMEOUT = 10.0


def _untracked(handler: Handler) -> Handler:
    return handler


async def serve(transport: Transport, port: int, track: Callable[[Handler], Handler] = _untracked, *,
                limit: int = MAX_CONNECTIONS, idle: float = IDLE_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                log: Log | None = None) -> asyncio.AbstractServer:
    gate = Gate(f"ingress port {port}", limit, log)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not gate.enter():
            writer.transport.abort()
            return
        try:
            try:
                app = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), connect_timeout)
            except (TimeoutError, OSError):
                writer.close()  # the app is not listening (yet): the client sees the connection close
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            await splice((reader, writer), app, app="b", idle=idle)
        finally:
            gate.leave()

    return await transport.listen(port, track(handle))
