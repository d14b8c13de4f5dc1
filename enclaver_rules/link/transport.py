"""Stream transports between the enclave and its parent: AF_VSOCK for real, Unix sockets elsewhere.

One small interface (listen, connect; streams with half-close) so that odyn, the host side, the
simulator and the tests run the same code. The Unix implementation emulates vsock addressing:
every endpoint is `(cid, port)`, and a listener on `(cid, port)` is the socket file
`<directory>/<cid>.<port>.sock`, so several "machines" can share one directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from enclaver_rules.ports import ANY_CID

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Transport(Protocol):
    local_cid: int

    async def listen(self, port: int, handler: Handler) -> asyncio.AbstractServer: ...

    async def connect(self, cid: int, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


class VsockTransport:
    """AF_VSOCK: listeners bind any CID; connections name the peer's CID (2 is the parent)."""

    def __init__(self, local_cid: int = ANY_CID) -> None:
        if not hasattr(socket, "AF_VSOCK"):
            raise OSError("this Python has no AF_VSOCK support")
        self.local_cid = local_cid

    async def listen(self, port: int, handler: Handler) -> asyncio.AbstractServer:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((ANY_CID, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return await asyncio.start_server(handler, sock=sock)

    async def connect(self, cid: int, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)


class UnixTransport:
    """vsock-like addressing over Unix sockets in one directory (the simulator and the tests)."""

    def __init__(self, directory: str | os.PathLike[str], local_cid: int) -> None:
        self.directory = Path(directory)
        self.local_cid = local_cid

    def path(self, cid: int, port: int) -> Path:
        return self.directory / f"{cid}.{port}.sock"

    async def listen(self, port: int, handler: Handler) -> asyncio.AbstractServer:
        path = self.path(self.local_cid, port)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket file from a previous run
        return await asyncio.start_unix_server(handler, path=str(path))

    async def connect(self, cid: int, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(str(self.path(cid, port)))
        except FileNotFoundError:
            raise ConnectionRefusedError(f"nothing listens on ({cid}, {port})") from None
