"""Transports: the Unix emulation of vsock addressing, half-close, refusals; AF_VSOCK where it exists."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from enclaver_rules.link.transport import UnixTransport, VsockTransport


def test_unix_transport_round_trip_with_half_close(tmp_path: Path) -> None:
    async def main() -> None:
        enclave, host = UnixTransport(tmp_path, local_cid=16), UnixTransport(tmp_path, local_cid=2)

        async def echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # everything, until the peer half-closes
            writer.write(data.upper())
            await writer.drain()
            writer.close()

        server = await enclave.listen(8001, echo_until_eof)
        assert (tmp_path / "16.8001.sock").exists()
        reader, writer = await host.connect(16, 8001)
        writer.write(b"hello ")
        writer.write(b"enclave")
        writer.write_eof()  # half-close: the peer sees EOF, we can still read
        assert await reader.read() == b"HELLO ENCLAVE"
        writer.close()
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectionRefusedError):
            await host.connect(16, 8002)

    asyncio.run(main())


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "16.17000.sock").write_text("stale")

    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await UnixTransport(tmp_path, 16).listen(17000, handler)
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_vsock_transport_where_the_kernel_has_it() -> None:
    """There is no vsock loopback here: a listener may bind, a connect to ourselves must fail cleanly."""
    if not hasattr(socket, "AF_VSOCK"):
        with pytest.raises(OSError):
            VsockTransport()
        return

    async def main() -> None:
        transport = VsockTransport()
        try:
            server = await transport.listen(47123, lambda r, w: asyncio.sleep(0))  # type: ignore[arg-type,return-value]
        except OSError:
            return  # no vsock device on this machine: binding is refused, as it must be
        server.close()
        await server.wait_closed()
        with pytest.raises(OSError):
            await asyncio.wait_for(transport.connect(1, 47123), 5)

    asyncio.run(main())
