"""Ingress: each `ingress[].listen_port` is accepted on the transport (vsock port = listen_port) and
relayed byte for byte, half-close aware, to 127.0.0.1:listen_port where the app listens. TLS, mTLS
and raw TCP (Vault's cluster port) pass untouched."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from odyn.relay import splice
from odyn.transport import Handler, Transport

CONNECT_TIMEOUT = 10.0


def _untracked(handler: Handler) -> Handler:
    return handler


async def serve(transport: Transport, port: int,
                track: Callable[[Handler], Handler] = _untracked) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            app = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT)
        except (TimeoutError, OSError):
            writer.close()  # the app is not listening (yet): the client sees the connection close
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        await splice((reader, writer), app, app="b")

    return await transport.listen(port, track(handle))
