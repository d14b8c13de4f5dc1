"""HTTP/1 request heads for the egress proxy, sans-IO: parse, check, re-assemble.

Bounded (64 KiB of head, 100 headers); anything malformed raises `HeadError` carrying the status
code to answer with, never a crash or a hang.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 64 << 10
MAX_HEADERS = 100
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-connection"})


class HeadError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


class HeadReader:
    """Feed bytes until `feed` returns a Request; bytes after the head are in `rest`."""

    def __init__(self) -> None:
        self.buffer = b""
        self.rest = b""

    def feed(self, data: bytes) -> Request | None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                raise HeadError(431, "request head too large")
            return None
        head, self.rest = self.buffer[:end], self.buffer[end + 4:]
        if len(head) > MAX_HEAD:
            raise HeadError(431, "request head too large")
        return parse_head(head)


def parse_head(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1] or not parts[2].startswith(b"HTTP/1."):
        raise HeadError(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise HeadError(431, "too many headers")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise HeadError(400, "malformed header line")
        try:
            headers.append((name.decode("ascii"), value.strip().decode("latin-1")))
        except UnicodeDecodeError:
            raise HeadError(400, "header name is not ASCII") from None
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise HeadError(400, "request target is not ASCII") from None
    return Request(parts[0].decode("ascii"), target, parts[2].decode("ascii"), tuple(headers))


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str  # http | https | connect
    host: str
    port: int
    path: str = "/"


def connect_target(target: str) -> Target:
    """`host:port` or `[v6]:port` of a CONNECT; the port is required (upstream answers 400 too)."""
    host, sep, port = target.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536 or not host:
        raise HeadError(400, "CONNECT needs host:port")
    return Target("connect", host.removeprefix("[").removesuffix("]"), int(port))


def absolute_target(target: str) -> Target:
    """`http://host[:port]/path` (port 80) or `https://…` (port 443 — upstream used 80 for both)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise HeadError(400, "a proxy request needs an absolute http:// or https:// URL")
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2]  # credentials in the URL are not forwarded as authority
    if authority.startswith("["):
        host, _, port_text = authority[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = authority.partition(":")
    default = 443 if scheme.lower() == "https" else 80
    if port_text and (not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536):
        raise HeadError(400, "bad port in URL")
    if not host:
        raise HeadError(400, "URL is missing a host")
    return Target(scheme.lower(), host, int(port_text) if port_text else default, "/" + path if slash else "/")


def origin_request(request: Request, target: Target) -> bytes:
    """The request as the origin sees it: origin-form target, no hop-by-hop or Proxy-* headers,
    `Host` set, `Connection: close` (one request per tunnelled connection)."""
    drop = set(HOP_BY_HOP)
    connection = request.header("connection")
    if connection:
        drop |= {token.strip().lower() for token in connection.split(",")}
    default = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    host_value = host if target.port == default else f"{host}:{target.port}"
    lines = [f"{request.method} {target.path} {request.version}", f"Host: {host_value}"]
    lines += [f"{k}: {v}" for k, v in request.headers
              if k.lower() not in drop and k.lower() != "host" and not k.lower().startswith("proxy-")]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(status: int, reason: str, body: str = "") -> bytes:
    payload = body.encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
