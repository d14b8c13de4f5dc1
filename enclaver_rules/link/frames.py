"""The egress tunnel handshake, sans-IO: what the enclave sends the host before raw bytes flow.

Upstream enclaver's format (../shared/reference/enclaver-compat.md §2): each message is a
2-byte little-endian length then that many bytes of JSON. Request `{"host": str, "port": int}`;
response `"Ok"` or `{"Err": {"os_code": int, "message": str}}`. After the response the stream
carries the connection's bytes unchanged.

Either end may be hostile, so decoding is total: any bytes give a document, None (need more) or
FrameError — never another exception (deep nesting, numbers past int's digit limit, invalid UTF-8
all become FrameError), and a decoded document is checked field by field before it is used.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

MAX_FRAME = 0xFFFF
MAX_HOST = 255  # a DNS name is at most 253 characters; leave room for brackets


class FrameError(ValueError):
    """A handshake that cannot be decoded; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ConnectResult:
    ok: bool
    os_code: int = 0
    message: str = ""


def _frame(document: object) -> bytes:
    payload = json.dumps(document, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise FrameError("frame too large")
    return struct.pack("<H", len(payload)) + payload


def encode_request(request: ConnectRequest) -> bytes:
    return _frame({"host": request.host, "port": request.port})


def encode_result(result: ConnectResult) -> bytes:
    return _frame("Ok" if result.ok else {"Err": {"os_code": result.os_code, "message": result.message}})


class FrameDecoder:
    """Feed bytes; `next()` returns one decoded JSON document when complete. Bytes after the frame
    are kept in `rest` (they belong to the tunnelled connection)."""

    def __init__(self) -> None:
        self.buffer = bytearray()  # appended in place: a peer dripping bytes costs no quadratic copying
        self.rest = b""

    def feed(self, data: bytes) -> object | None:
        """The frame's document once complete, else None (so a JSON `null` frame is an error: None
        must keep meaning "not yet")."""
        self.buffer += data
        if len(self.buffer) < 2:
            return None
        (length,) = struct.unpack_from("<H", self.buffer)
        if len(self.buffer) < 2 + length:
            return None
        payload, self.rest = bytes(self.buffer[2:2 + length]), bytes(self.buffer[2 + length:])
        self.buffer = bytearray()
        try:
            document: object = json.loads(payload)
            if document is None:
                raise FrameError("handshake is null")
            return document
        except RecursionError:
            raise FrameError("handshake is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past the digit limit
            raise FrameError(f"handshake is not JSON: {e}") from None


def decode_request(document: object) -> ConnectRequest:
    if not isinstance(document, dict) or set(document) != {"host", "port"}:
        raise FrameError("handshake must be {\"host\": ..., \"port\": ...}")
    host, port = document["host"], document["port"]
    if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST:
        raise FrameError("host must be a non-empty string")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise FrameError("port must be 1..65535")
    return ConnectRequest(host, port)


def decode_result(document: object) -> ConnectResult:
    if document == "Ok":
        return ConnectResult(True)
    if isinstance(document, dict) and isinstance(document.get("Err"), dict):
        err = document["Err"]
        code, message = err.get("os_code", 0), err.get("message", "")
        if isinstance(code, int) and not isinstance(code, bool) and isinstance(message, str):
            return ConnectResult(False, code, message)
    raise FrameError("handshake answer must be \"Ok\" or {\"Err\": {...}}")
