"""The enclave side of egress: an HTTP proxy on 127.0.0.1 that lets out only what the policy allows.

CONNECT host:port and absolute-form requests (`GET http://…`, and `https://` URLs sent in plain
form, for which the proxy speaks TLS to the origin) are checked against the egress policy before
anything leaves; a denied request gets 403 naming the destination, the deciding rule and the reason.
Allowed ones are tunnelled over the transport to the host side (CID 2, port 17002), which checks the
policy again against the addresses it resolves. Every refusal is also a line in odyn's log (once per
destination and 10 s), since apps seldom show an error's body (an AWS SDK says only "403 Forbidden").

The app is a hostile client here. Every wait has a bound that dripping bytes cannot extend: the
request head must be complete within `head_timeout` of the accept, and the tunnel (the host
side's answer, and TLS with the origin for https:// URLs) within `handshake_timeout`, both
absolute; a tunnel then ends when nothing moved either way for `idle_timeout`. At most
`max_connections` are served at once; one over gets 503 (a redirected one a reset) and a log line.
Requests are framed strictly (see `http_head`): what the origin gets is one request whose body is
exactly what its framing says, never what follows it; the app gets the answer with `Connection:
close` after its status line (`ClosingResponse`), since the connection ends with it. Bad input gets
a 4xx or 5xx answer or a logged close, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import socket
import ssl
import struct
from dataclasses import dataclass, field

from enclaver_rules.link.frames import ConnectRequest, FrameDecoder, FrameError, decode_result, encode_request
from enclaver_rules.link.relay import IDLE_TIMEOUT, splice
from enclaver_rules.link.transport import Transport
from enclaver_rules.policy import EgressPolicy, PolicyError
from enclaver_rules.ports import EGRESS_PORT, HOST_CID
from odyn import dns, local_http
from odyn.connections import MAX_CONNECTIONS, Gate, Log, Throttle
from odyn.http_head import (
    ClosingResponse,
    HeadError,
    HeadReader,
    Request,
    Target,
    absolute_target,
    connect_target,
    origin_request,
    request_framing,
    response,
)

HEAD_TIMEOUT = 30.0  # absolute: from the accept to the end of the request head
HANDSHAKE_TIMEOUT = 60.0  # absolute: the host side's answer (it may try several addresses) and TLS
ANSWER_TIMEOUT = 2.0  # an error answer: how long the client's leftovers are read and dropped after it
ANSWER_DRAIN = 1 << 20  # and how many of them at most


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
    head_timeout: float = HEAD_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    log: Log | None = None  # where lines go; default `odyn.connections.log` (stderr unless set)
    gate: Gate = field(init=False)
    _say: Throttle = field(init=False)

    def __post_init__(self) -> None:
        self.gate = Gate("egress proxy", self.max_connections, self.log)
        self._say = Throttle(self.log)

    def redirected(self, writer: asyncio.StreamWriter) -> Target | None:
        """The destination of a connection netfilter redirected here (transparent egress), if any."""
        original = self._original(writer)
        if original is None or self.book is None:
            return None
        address, port = original
        name = self.book.name_for(ipaddress.IPv4Address(address))
        if name is None:
            raise Refused(403, "Forbidden", f"{address} was not handed out by odyn's DNS (or expired)\n")
        return Target("connect", name, port)

    def _original(self, writer: asyncio.StreamWriter) -> tuple[str, int] | None:
        from odyn.transparent import original_destination

        sock = writer.get_extra_info("socket")
        return original_destination(sock) if self.book is not None and sock is not None else None

    async def transparent(self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """No HTTP here: the app thinks it talks to the origin. A refusal can only close the socket."""
        try:
            self.decide(target)
            up_reader, up_writer, early = await self.setup(target)
        except Refused as e:
            self._refused(target, e)
            _reset(writer)
            return
        await splice((reader, writer), (up_reader, up_writer), first_to_a=early, app="a", idle=self.idle_timeout)

    def decide(self, target: Target) -> None:
        host = f"[{target.host}]" if ":" in target.host else target.host
        try:
            decision = self.policy.decide(f"{host}:{target.port}")
        except PolicyError as e:
            raise Refused(400, "Bad Request", f"{e.message}\n") from None
        if not decision.allowed:
            raise Refused(403, "Forbidden", f"{host}:{target.port} is denied by the enclave's egress policy "
                                            f"(egress in enclaver.yaml): {decision.reason}\n")

    async def setup(self, target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """The tunnel to `target` through the host side and, for an https:// URL, TLS with the origin:
        all of it within `handshake_timeout`, however the bytes trickle in."""
        try:
            frame = encode_request(ConnectRequest(target.host, target.port))
        except FrameError:
            raise Refused(400, "Bad Request", "the destination does not fit in a tunnel request\n") from None
        opened: list[asyncio.StreamWriter] = []
        try:
            async with asyncio.timeout(self.handshake_timeout):
                up_reader, up_writer, early = await self.tunnel(frame, opened)
                if target.scheme == "https":
                    # Bytes before the handshake are plaintext from anyone on the path: passed on, they
                    # would read as the origin's answer. (Checked after it too: an HTTP origin says
                    # nothing before it has the request, so anything buffered then came in the clear.)
                    if early or _buffered(up_reader):
                        raise Refused(502, "Bad Gateway", "the origin sent bytes before the TLS handshake\n")
                    await up_writer.start_tls(self.ssl_context or ssl.create_default_context(),
                                              server_hostname=target.host)
                    if _buffered(up_reader):
                        raise Refused(502, "Bad Gateway", "the origin sent bytes before the TLS handshake\n")
            return up_reader, up_writer, early
        except TimeoutError:
            _abort(opened)
            raise Refused(504, "Gateway Timeout", f"no tunnel to {target.host}:{target.port} within "
                                                  f"{self.handshake_timeout:g} s\n") from None
        except ssl.SSLError as e:
            _abort(opened)
            raise Refused(502, "Bad Gateway", f"TLS with {target.host}:{target.port} failed: "
                                              f"{e.reason or type(e).__name__}\n") from None
        except BaseException:
            _abort(opened)
            raise

    async def tunnel(self, frame: bytes, opened: list[asyncio.StreamWriter]) -> tuple[
            asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        try:
            reader, writer = await self.transport.connect(HOST_CID, EGRESS_PORT)
        except OSError as e:
            raise Refused(503, "Service Unavailable", f"the host side of egress is not reachable: {e}\n") from None
        opened.append(writer)
        writer.write(frame)
        decoder, document = FrameDecoder(), None
        try:
            while document is None:
                chunk = await reader.read(4096)
                if not chunk:
                    raise Refused(502, "Bad Gateway", "the host side closed the tunnel\n")
                document = decoder.feed(chunk)
            result = decode_result(document)
        except FrameError as e:
            raise Refused(502, "Bad Gateway", f"bad answer from the host side: {e}\n") from None
        if not result.ok:
            status = 403 if result.os_code == errno.EACCES else 502
            raise Refused(status, "Forbidden" if status == 403 else "Bad Gateway", f"{result.message}\n")
        return reader, writer, decoder.rest

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.gate.enter():
            self._turn_away(writer)
            return
        try:
            await self._serve(reader, writer)
        except Exception as e:  # noqa: BLE001 - the last line: a bug costs one connection and a line, no traceback
            self._say("internal", f"odyn: egress proxy: internal error, connection closed: {type(e).__name__}: {e}")
            writer.transport.abort()
        finally:
            self.gate.leave()

    def _turn_away(self, writer: asyncio.StreamWriter) -> None:
        if self._original(writer) is not None:
            _reset(writer)
            return
        writer.write(response(503, "Service Unavailable",
                              f"odyn's egress proxy has {self.gate.limit} connections open, its limit\n"))
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            request = await self._read_head(reader, head)
            if request is None:
                writer.close()
                return
            framing = request_framing(request)
            if request.method.upper() == "CONNECT":
                if framing.kind == "chunked" or framing.length:
                    raise HeadError(400, "a CONNECT request has no content")
                target = connect_target(request.target)
                self.decide(target)
                up_reader, up_writer, early = await self.setup(target)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await splice((reader, writer), (up_reader, up_writer), first_to_b=head.rest, first_to_a=early,
                             app="a", idle=self.idle_timeout)
                return
            target = absolute_target(request.target)
            self.decide(target)
            body = framing.body()
            first = origin_request(request, target, framing) + body.feed(head.rest)  # a bad early body: 400 here
            up_reader, up_writer, early = await self.setup(target)
            answer = ClosingResponse()  # the app's connection ends with this exchange: the answer says so
            await splice((reader, writer), (up_reader, up_writer), first_to_b=first, first_to_a=answer.feed(early),
                         app="a", idle=self.idle_timeout, to_b=body.feed, to_a=answer.feed,
                         on_error=functools.partial(self._body_fault, target))
        except HeadError as e:
            await _answer(reader, writer, e.status, e.reason, f"{e.message}\n")
        except Refused as e:
            if target is not None:
                self._refused(target, e)
            await _answer(reader, writer, e.status, e.reason, e.body)
        except (ConnectionError, ssl.SSLError, OSError):
            writer.transport.abort()

    async def _read_head(self, reader: asyncio.StreamReader, head: HeadReader) -> Request | None:
        """The request head, within `head_timeout` of now (not of the last byte); None if the client
        closed first."""
        try:
            async with asyncio.timeout(self.head_timeout):
                while True:
                    chunk = await reader.read(8192)
                    if not chunk:
                        return None
                    request = head.feed(chunk)
                    if request is not None:
                        return request
        except TimeoutError:
            raise Refused(408, "Request Timeout",
                          f"the request head did not arrive within {self.head_timeout:g} s\n") from None

    def _refused(self, target: Target, error: Refused) -> None:
        """A log line for a refused destination, throttled per destination: what the app shows of a
        403 is often just "Forbidden", so the reason has to be visible somewhere."""
        host = f"[{target.host}]" if ":" in target.host else target.host
        body = error.body.strip()
        if not body.startswith(f"{host}:{target.port}"):
            body = f"{host}:{target.port}: {body}"
        self._say(f"refused {host}:{target.port}", f"odyn: egress proxy: refused ({error.status} {error.reason}) {body}")

    def _body_fault(self, target: Target, error: Exception) -> None:
        self._say("body", f"odyn: egress proxy: a request body to {target.host}:{target.port} broke its framing "
                          f"({error}); both connections closed")


def _buffered(reader: asyncio.StreamReader) -> bool:
    return bool(getattr(reader, "_buffer", b""))  # StreamReader keeps it private (see link.relay._take_over)


def _abort(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.transport.abort()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the app sees "connection reset", as from a firewall's reject."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, reason: str,
                  body: str) -> None:
    """An error answer, sent and closed cleanly (`local_http.send`); a client may still be sending a
    large body, so up to ANSWER_DRAIN of it is read and dropped."""
    await local_http.send(reader, writer, response(status, reason, body), timeout=ANSWER_TIMEOUT, drain=ANSWER_DRAIN)
