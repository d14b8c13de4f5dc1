"""The enclave side of egress: an HTTP proxy on 127.0.0.1 that lets out only what the policy allows.

CONNECT host:port and absolute-form requests (`GET http://…`, and `https://` URLs sent in plain
form, for which the proxy speaks TLS to the origin) are checked against the egress policy before
anything leaves; a denied request gets 403 with the deciding rule and the reason. Allowed ones
are tunnelled over the transport to the host side (CID 2, port 17002), which checks the policy
again against the addresses it resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import struct
from dataclasses import dataclass

from enclaver_rules.policy import EgressPolicy, PolicyError
from enclaver_rules.ports import EGRESS_PORT, HOST_CID
from odyn import dns
from odyn.egress_frame import ConnectRequest, FrameDecoder, FrameError, decode_result, encode_request
from odyn.http_head import HeadError, HeadReader, Target, absolute_target, connect_target, origin_request, response
from odyn.relay import splice
from odyn.transport import Transport

HEAD_TIMEOUT = 30.0


class Refused(Exception):
    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(body)
        self.status, self.reason, self.body = status, reason, body


@dataclass
class EgressProxy:
    policy: EgressPolicy
    transport: Transport
    ssl_context: ssl.SSLContext | None = None  # for https:// in plain form; default: system trust
    book: dns.AddressBook | None = None  # transparent egress: placeholder address → name

    def redirected(self, writer: asyncio.StreamWriter) -> Target | None:
        """The destination of a connection netfilter redirected here (transparent egress), if any."""
        from odyn.transparent import original_destination

        sock = writer.get_extra_info("socket")
        original = original_destination(sock) if self.book is not None and sock is not None else None
        if original is None or self.book is None:
            return None
        address, port = original
        name = self.book.name_for(ipaddress.IPv4Address(address))
        if name is None:
            raise Refused(403, "Forbidden", f"{address} was not handed out by odyn's DNS (or expired)\n")
        return Target("connect", name, port)

    async def transparent(self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """No HTTP here: the app thinks it talks to the origin. A refusal can only close the socket."""
        try:
            self.decide(target)
            up_reader, up_writer, early = await self.tunnel(target)
        except Refused:
            _reset(writer)
            return
        await splice((reader, writer), (up_reader, up_writer), first_to_a=early, app="a")

    def decide(self, target: Target) -> None:
        host = f"[{target.host}]" if ":" in target.host else target.host
        try:
            decision = self.policy.decide(f"{host}:{target.port}")
        except PolicyError as e:
            raise Refused(400, "Bad Request", f"{e.message}\n") from None
        if not decision.allowed:
            raise Refused(403, "Forbidden", f"denied by the enclave's egress policy: {decision.reason}\n")

    async def tunnel(self, target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        try:
            reader, writer = await self.transport.connect(HOST_CID, EGRESS_PORT)
        except OSError as e:
            raise Refused(503, "Service Unavailable", f"the host side of egress is not reachable: {e}\n") from None
        writer.write(encode_request(ConnectRequest(target.host, target.port)))
        decoder, document = FrameDecoder(), None
        try:
            while document is None:
                chunk = await asyncio.wait_for(reader.read(4096), HEAD_TIMEOUT)
                if not chunk:
                    raise Refused(502, "Bad Gateway", "the host side closed the tunnel\n")
                document = decoder.feed(chunk)
            result = decode_result(document)
        except (TimeoutError, FrameError) as e:
            writer.close()
            raise Refused(502, "Bad Gateway", f"bad answer from the host side: {e}\n") from None
        if not result.ok:
            writer.close()
            status = 403 if result.os_code == 13 else 502
            raise Refused(status, "Forbidden" if status == 403 else "Bad Gateway", f"{result.message}\n")
        return reader, writer, decoder.rest

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target = self.redirected(writer)
        except Refused:
            _reset(writer)
            return
        if target is not None:
            await self.transparent(target, reader, writer)
            return
        head = HeadReader()
        try:
            request = None
            while request is None:
                chunk = await asyncio.wait_for(reader.read(8192), HEAD_TIMEOUT)
                if not chunk:
                    writer.close()
                    return
                request = head.feed(chunk)
            if request.method.upper() == "CONNECT":
                target = connect_target(request.target)
                self.decide(target)
                up_reader, up_writer, early = await self.tunnel(target)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await splice((reader, writer), (up_reader, up_writer), first_to_b=head.rest, first_to_a=early,
                             app="a")
                return
            target = absolute_target(request.target)
            self.decide(target)
            up_reader, up_writer, early = await self.tunnel(target)
            if target.scheme == "https":
                await up_writer.start_tls(self.ssl_context or ssl.create_default_context(), server_hostname=target.host)
            await splice((reader, writer), (up_reader, up_writer), first_to_b=origin_request(request, target) + head.rest,
                         first_to_a=early, app="a")
        except HeadError as e:
            await _answer(writer, e.status, "Bad Request" if e.status == 400 else "Request Header Fields Too Large",
                          f"{e.message}\n")
        except Refused as e:
            await _answer(writer, e.status, e.reason, e.body)
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            writer.transport.abort()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the app sees "connection reset", as from a firewall's reject."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str, body: str) -> None:
    try:
        writer.write(response(status, reason, body))
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
