"""HTTP/1 request heads for the egress proxy, sans-IO: parse, check, frame, re-assemble.

Strict by design (RFC 9112), because the proxy sits between a client and an origin that may parse
the same bytes differently (request smuggling): a request whose framing is ambiguous is refused,
never repaired. Refused with 400: a malformed request line or version; obs-fold; a CR, LF, NUL or
other control character in a header value or anywhere a line ends other than CRLF; whitespace
before a header's colon; Transfer-Encoding together with Content-Length; Transfer-Encoding in an
HTTP/1.0 request, or one whose codings are not exactly `chunked` once and last (501 for another
coding); Content-Length that is not 1*DIGIT or has conflicting values. The body is then forwarded
exactly as framed (`Framing.body()`): so many bytes for Content-Length, the chunked body up to and
including its trailer section for chunked, nothing otherwise. Bytes after it (a pipelined or
smuggled request) are never forwarded.

Bounded (64 KiB of head, 100 headers, 4 KiB chunk lines, 64 KiB of trailers); anything malformed
raises `HeadError` carrying the status code to answer with, never a crash or a hang.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

MAX_HEAD = 64 << 10
MAX_HEADERS = 100
MAX_CHUNK_LINE = 4 << 10  # a chunk-size line with its extensions
MAX_TRAILERS = 64 << 10
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: no space, no control, no obs-text
_VERSION = re.compile(rb"HTTP/1\.[01]")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # every CTL but HTAB: CR, LF and NUL among them
_DIGITS = re.compile(r"[0-9]{1,18}")  # Content-Length: 1*DIGIT, below 2**63
_PORT = re.compile(r"[0-9]{1,5}")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_TOK = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*" + _TOK + rb"(?:[ \t]*=[ \t]*(?:" + _TOK + rb"|"
                         + _QUOTED + rb"))?)*)")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-connection"})
FRAMING = frozenset({"content-length", "transfer-encoding"})  # written by the proxy from `Framing`, never copied


class HeadError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def reason(self) -> str:
        return reason(self.status)


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def values(self, name: str) -> list[str]:
        """Every value of a list-valued header, over all its lines (`a, b` and two lines alike)."""
        lowered = name.lower()
        return [item.strip(" \t") for k, v in self.headers if k.lower() == lowered for item in v.split(",")]


class HeadReader:
    """Feed bytes until `feed` returns a Request; bytes after the head are in `rest`.

    Each byte is scanned once for the end of the head, so a head dripped a byte at a time costs
    linear, not quadratic, time."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.rest = b""
        self._scanned = 0

    def feed(self, data: bytes) -> Request | None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(self.buffer)
            if len(self.buffer) > MAX_HEAD:
                raise HeadError(431, "request head too large")
            return None
        if end > MAX_HEAD:
            raise HeadError(431, "request head too large")
        head, self.rest = bytes(self.buffer[:end]), bytes(self.buffer[end + 4:])
        return parse_head(head)


def parse_head(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise HeadError(400, "malformed request line")
    if not _VERSION.fullmatch(parts[2]):
        raise HeadError(400, "the request line must end in HTTP/1.0 or HTTP/1.1")
    if len(lines) - 1 > MAX_HEADERS:
        raise HeadError(431, "too many headers")
    headers = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "obsolete line folding (a header line that starts with whitespace)")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HeadError(400, "malformed header line")
        value = value.strip(b" \t")
        if _CONTROL.search(value):
            raise HeadError(400, f"header {name.decode('ascii')} has a control character (CR, LF, NUL …) in its value")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return Request(parts[0].decode("ascii"), parts[1].decode("ascii"), parts[2].decode("ascii"), tuple(headers))


# -- framing --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Framing:
    """How the request's body is delimited: none, Content-Length bytes, or chunked."""

    kind: Literal["none", "length", "chunked"]
    length: int = 0

    def header(self) -> str | None:
        """The framing header the origin gets: the only one, whatever the client's headers said."""
        if self.kind == "length":
            return f"Content-Length: {self.length}"
        return "Transfer-Encoding: chunked" if self.kind == "chunked" else None

    def body(self) -> LengthBody | ChunkedBody:
        return ChunkedBody() if self.kind == "chunked" else LengthBody(self.length)


def request_framing(request: Request) -> Framing:
    """The body's framing by RFC 9112 §6.3, refusing every ambiguous or malformed case."""
    names = {k.lower() for k, _ in request.headers}
    if "transfer-encoding" in names:
        if "content-length" in names:
            raise HeadError(400, "both Transfer-Encoding and Content-Length: the framing is ambiguous")
        if request.version == "HTTP/1.0":
            raise HeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.lower() for c in request.values("transfer-encoding")]
        if codings == ["chunked"]:
            return Framing("chunked")
        if codings.count("chunked") == 1 and codings[-1] == "chunked" and all(_TOKEN.fullmatch(c.encode())
                                                                             for c in codings):
            raise HeadError(501, "only the chunked transfer coding is supported")
        raise HeadError(400, "Transfer-Encoding must end in chunked, once")
    if "content-length" in names:
        values = request.values("content-length")
        if not all(_DIGITS.fullmatch(v) for v in values):
            raise HeadError(400, "Content-Length must be decimal digits")
        lengths = {int(v) for v in values}
        if len(lengths) != 1:
            raise HeadError(400, "conflicting Content-Length values")
        return Framing("length", lengths.pop())
    return Framing("none")


class LengthBody:
    """Passes on exactly `length` bytes, then nothing (what follows is counted in `discarded`)."""

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.discarded = 0

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, data: bytes) -> bytes:
        if len(data) <= self.remaining:
            self.remaining -= len(data)
            return data
        out, self.remaining = data[:self.remaining], 0
        self.discarded += len(data) - len(out)
        return out


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedBody:
    """Passes on a chunked body byte for byte, checking its framing (RFC 9112 §7.1), up to and
    including the empty line after the trailers; nothing after it. Chunk data is sliced through
    without being looked at; only the size lines and trailers are parsed. Raises HeadError (400)
    at the first byte that breaks the framing: what was returned before it was well-formed."""

    def __init__(self) -> None:
        self.state = _SIZE
        self.remaining = 0
        self.line = bytearray()
        self.trailer_bytes = 0
        self.trailer_lines = 0
        self.discarded = 0

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes) -> bytes:
        if self.state == _DATA and len(data) < self.remaining:  # the common case: inside a chunk
            self.remaining -= len(data)
            return data
        out: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            if self.state == _DATA:
                take = min(self.remaining, size - pos)
                out.append(data[pos:pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = _DATA_END
            elif self.state == _DONE:
                self.discarded += size - pos
                break
            else:
                end = data.find(b"\n", pos)
                stop = size if end < 0 else end + 1
                self.line += data[pos:stop]
                pos = stop
                limit = MAX_TRAILERS - self.trailer_bytes if self.state == _TRAILER else MAX_CHUNK_LINE
                if len(self.line) > limit:
                    raise HeadError(400, "chunked body: line too long")
                if end >= 0:
                    line = bytes(self.line)
                    self.line.clear()
                    self._line(line)
                    out.append(line)
        return b"".join(out)

    def _line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise HeadError(400, "chunked body: a line that does not end in CRLF")
        content = line[:-2]
        if self.state == _SIZE:
            match = _CHUNK_SIZE.fullmatch(content)
            if match is None:
                raise HeadError(400, "chunked body: malformed chunk-size line")
            self.remaining = int(match.group(1), 16)
            self.state = _DATA if self.remaining else _TRAILER
        elif self.state == _DATA_END:
            if content:
                raise HeadError(400, "chunked body: chunk data longer than its size")
            self.state = _SIZE
        elif not content:  # the empty line that ends the trailer section, and the body
            self.state = _DONE
        else:
            self.trailer_bytes += len(line)
            self.trailer_lines += 1
            name, colon, value = content.partition(b":")
            if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
                raise HeadError(400, "chunked body: malformed trailer field")
            if self.trailer_lines > MAX_HEADERS:
                raise HeadError(400, "chunked body: too many trailer fields")


# -- targets and the origin's request -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str  # http | https | connect
    host: str
    port: int
    path: str = "/"


def connect_target(target: str) -> Target:
    """`host:port` or `[v6]:port` of a CONNECT; the port is required (upstream answers 400 too)."""
    host, sep, port = target.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536 or not host:
        raise HeadError(400, "CONNECT needs host:port")
    return Target("connect", host.removeprefix("[").removesuffix("]"), int(port))


def absolute_target(target: str) -> Target:
    """`http://host[:port]/path` (port 80) or `https://…` (port 443 — upstream used 80 for both)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise HeadError(400, "a proxy request needs an absolute http:// or https:// URL")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    authority = authority.rpartition("@")[2]  # credentials in the URL are not forwarded as authority
    if authority.startswith("["):
        host, _, port_text = authority[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = authority.partition(":")
    default = 443 if scheme.lower() == "https" else 80
    if port_text and (not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536):
        raise HeadError(400, "bad port in URL")
    if not host:
        raise HeadError(400, "URL is missing a host")
    return Target(scheme.lower(), host, int(port_text) if port_text else default, path if path[:1] == "/" else "/" + path)


def origin_request(request: Request, target: Target, framing: Framing | None = None) -> bytes:
    """The request as the origin sees it: origin-form target, no hop-by-hop or Proxy-* headers,
    `Host` set, the body's framing header written from `framing` (so a `Connection` header cannot
    remove it), `Connection: close` (one request per tunnelled connection)."""
    framing = framing if framing is not None else request_framing(request)
    drop = HOP_BY_HOP | FRAMING | {"host"}
    connection = request.header("connection")
    if connection:
        drop |= {token.strip().lower() for token in connection.split(",")}
    default = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    host_value = host if target.port == default else f"{host}:{target.port}"
    lines = [f"{request.method} {target.path} {request.version}", f"Host: {host_value}"]
    lines += [f"{k}: {v}" for k, v in request.headers if k.lower() not in drop and not k.lower().startswith("proxy-")]
    if (header := framing.header()) is not None:
        lines.append(header)
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(status: int, reason: str, body: str = "") -> bytes:
    payload = body.encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?\r\n")


class ClosingResponse:
    """The origin's answer to a forwarded request, as the app gets it: `Connection: close` right after
    the final response's status line (interim 1xx responses pass as they are; a `101` and anything
    that is not an HTTP/1.x status line pass unchanged, and so does everything after the insertion).

    The proxy closes the app's connection after one exchange, so it must say so (RFC 9112 §9.6): an
    origin that was sent `Connection: close` need not echo it, and without it an HTTP/1.1 client
    that pools connections (botocore 1.29 with urllib3 1.26, fetching credentials from IMDS) may send
    its next request on this connection as the proxy closes it, and see the connection drop with no
    answer. A `Connection: keep-alive` of the origin's stays after ours: the list then holds `close`,
    which wins. Only the status line (and whole interim heads) are held back, at most MAX_HEAD bytes;
    each byte is scanned once."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.done = False  # the insertion is made (or will never be): the rest passes as it is
        self._status_end = -1  # the end of an interim response's status line, once seen
        self._scanned = 0

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self.buffer += data
        out = bytearray()
        while not self.done:
            if self._status_end < 0:
                end = self.buffer.find(b"\n", self._scanned)
                if end < 0:
                    self._scanned = len(self.buffer)
                    self.done = len(self.buffer) > MAX_HEAD
                    break
                match = _STATUS_LINE.fullmatch(self.buffer, 0, end + 1)
                status = int(match.group(1)) if match else 0
                if not 100 <= status < 200 or status == 101:
                    if status >= 200:
                        out += self.buffer[:end + 1] + b"Connection: close\r\n"
                        del self.buffer[:end + 1]
                    self.done = True
                    break
                self._status_end = self._scanned = end + 1
            head_end = self.buffer.find(b"\r\n\r\n", max(self._status_end - 2, self._scanned - 3))
            if head_end < 0:  # an interim head, still coming
                self._scanned = len(self.buffer)
                self.done = len(self.buffer) > MAX_HEAD
                break
            out += self.buffer[:head_end + 4]
            del self.buffer[:head_end + 4]
            self._status_end, self._scanned = -1, 0
        if self.done:
            out += self.buffer
            self.buffer.clear()
        return bytes(out)
