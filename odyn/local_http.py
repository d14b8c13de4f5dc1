"""One-request HTTP/1.1 services on 127.0.0.1 for the app: the attestation API and the KMS proxy.

What both share, so it exists once: the connection limit (`Gate`; one over it gets 503), the
request head read by `http_head` (strict RFC 9112; 431 over 64 KiB or 100 headers), a body that
needs `Content-Length` (411 without, chunked included) of at most `max_body` (413, decided before
a byte of it is read; `Expect: 100-continue` honoured), head and body within `request_timeout` of
the accept however they trickle in (408), one request per connection (`Connection: close`), and
the answer sent cleanly: half-close, then the client's leftovers read and dropped (bounded), so
closing with unread bytes does not reset the connection before the client has read the answer.

A service (`Service`) says which requests it routes, how it answers one, and what its errors look
like (text for the attestation API, KMS's JSON error shape for the KMS proxy). A bug in a service
costs one connection and a throttled log line, never odyn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from enclaver_rules.link.transport import Handler
from odyn.connections import Gate, Log, Throttle
from odyn.http_head import HeadError, HeadReader, Request, reason, request_framing

ANSWER_TIMEOUT = 2.0  # after the answer: how long the client's leftovers are read and dropped
ANSWER_DRAIN = 64 << 10  # and how many of them at most
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HttpError(Exception):
    """A request answered with `status` and `message` (one line) instead of what it asked for."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Service(Protocol):
    def route(self, request: Request) -> None:
        """Raise HttpError (404, 405 …) for a request this service does not take, from its head alone."""

    async def respond(self, request: Request, body: bytes) -> bytes:
        """The whole answer (head and body) to a routed request whose body has arrived."""

    def error(self, status: int, message: str, *, head_only: bool = False) -> bytes:
        """The whole answer for an error, in this service's shape."""


def body_length(request: Request, limit: int, service: str) -> int:
    """The body's Content-Length: required, at most `limit`; framing errors as `http_head` finds them."""
    framing = request_framing(request)
    if framing.kind != "length":
        raise HttpError(411, "send the body with Content-Length" +
                             (" (chunked bodies are not accepted)" if framing.kind == "chunked" else ""))
    if framing.length > limit:
        raise HttpError(413, f"the body is {framing.length} bytes; the {service} takes at most {limit}")
    return framing.length


def answer(status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8", *,
           head_only: bool = False, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A whole HTTP/1.1 answer with Content-Length and `Connection: close`; a str body gets a newline."""
    payload = f"{body}\n".encode("utf-8", "backslashreplace") if isinstance(body, str) else body
    lines = [f"HTTP/1.1 {status} {reason(status)}", f"Content-Type: {content_type}",
             f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if status == 405:
        lines.append("Allow: POST")
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else payload)


@dataclass
class LocalServer:
    """Serves `service` one request per connection, within the limits above."""

    name: str  # for errors and log lines: "attestation API", "KMS proxy"
    service: Service
    request_timeout: float
    max_connections: int
    max_body: int
    log: Log | None = None  # where lines go; default `odyn.connections.log`
    gate: Gate = field(init=False)
    say: Throttle = field(init=False)

    def __post_init__(self) -> None:
        self.gate = Gate(self.name, self.max_connections, self.log)
        self.say = Throttle(self.log)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.gate.enter():
            writer.write(self.service.error(503, f"the {self.name} has {self.gate.limit} connections open, its limit"))
            writer.close()
            return
        try:
            response = await self._exchange(reader, writer)
            if response is None:
                writer.transport.abort()
            else:
                await send(reader, writer, response)
        except Exception as e:  # noqa: BLE001 - the last line: a bug costs one connection and a line, no traceback
            self.say("internal", f"odyn: {self.name}: internal error, connection closed: {type(e).__name__}: {e}")
            writer.transport.abort()
        finally:
            self.gate.leave()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        """The answer to the connection's one request; None when the client left before sending it."""
        head = HeadReader()
        request: Request | None = None
        try:
            async with asyncio.timeout(self.request_timeout):
                while request is None:
                    chunk = await reader.read(8192)
                    if not chunk:
                        return None
                    request = head.feed(chunk)
                self.service.route(request)
                length = body_length(request, self.max_body, self.name)
                expect = request.header("expect")
                if expect is not None and expect.lower() != "100-continue":
                    raise HttpError(417, "the only expectation understood is 100-continue")
                body = bytearray(head.rest[:length])
                if expect is not None and len(body) < length and request.version == "HTTP/1.1":
                    writer.write(CONTINUE)
                while len(body) < length:
                    chunk = await reader.read(min(65536, length - len(body)))
                    if not chunk:
                        raise HttpError(400, f"the body ended after {len(body)} of its {length} bytes")
                    body += chunk
        except TimeoutError:
            return self.service.error(408, f"the request did not arrive within {self.request_timeout:g} s")
        except (HeadError, HttpError) as e:
            return self.service.error(e.status, e.message, head_only=request is not None and request.method == "HEAD")
        return await self.service.respond(request, bytes(body))


async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, *,
               timeout: float = ANSWER_TIMEOUT, drain: int = ANSWER_DRAIN) -> None:
    """Answer and close cleanly: send, half-close, then read and drop what the client still sends
    (at most `drain` bytes for `timeout` seconds), so that closing with unread bytes does not turn
    into a reset that destroys the answer before the client has read it. The egress proxy's error
    answers use it too."""
    clean = False
    try:
        writer.write(data)
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(timeout):
            await writer.drain()
            dropped = 0
            while dropped < drain and (chunk := await reader.read(65536)):
                dropped += len(chunk)
            clean = dropped < drain
    except (TimeoutError, ConnectionError, OSError):
        pass
    finally:
        if clean:
            writer.close()
        else:
            writer.transport.abort()


def untracked(handler: Handler) -> Handler:
    return handler


async def listen(handler: Handler, name: str, port: int, track: Callable[[Handler], Handler] = untracked, *,
                 host: str = "127.0.0.1") -> asyncio.AbstractServer:
    """Listen on `host:port` (127.0.0.1: only the enclave's own processes can reach it)."""
    try:
        return await asyncio.start_server(track(handler), host, port)
    except OSError as e:
        raise OSError(e.errno, f"the {name} cannot listen on {host}:{port}: {e.strerror}") from None
