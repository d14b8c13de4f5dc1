"""The files-out stream (vsock 17003, ours), sans-IO: files odyn copies out of the enclave's `outputs:`.

odyn listens; the host side connects and only reads. Nothing the host sends is ever read, so no
data flows into the enclave on this port. Each frame is a 15-byte header then the name then the
payload:

    kind: u8 | name length: u16 | offset: u64 | payload length: u32   (big-endian)

- kind 1, FILE: "the frames for `name` that follow come from the file whose identity is the
  payload (its device and inode), which is now `offset` bytes long". A receiver whose copy has a
  different identity, or is longer than `offset` (the file was truncated), starts its copy over.
- kind 2, DATA: `payload` is the file's bytes at `offset`.

Names are relative POSIX paths (the output's absolute path without its leading `/`, then the
file's path inside it), UTF-8, with no empty, `.` or `..` component, no NUL and no backslash:
the decoder refuses anything else, so a receiver never sees a name that could climb out.

Decoding is total: any bytes give frames, "need more" or FilesFrameError, never another exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct(">BHQI")
FILE = 1
DATA = 2
MAX_NAME = 1024  # bytes of UTF-8
MAX_COMPONENT = 255  # bytes, as Linux's NAME_MAX
MAX_DATA = 64 << 10
MAX_IDENTITY = 32
MAX_OFFSET = 1 << 48


class FilesFrameError(ValueError):
    """A frame that cannot be decoded or breaks a limit; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    name: str
    offset: int
    payload: bytes


def check_name(name: str) -> str:
    """`name` if it is a safe relative path, else FilesFrameError."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise FilesFrameError("a name must be UTF-8") from None
    if not 0 < len(encoded) <= MAX_NAME:
        raise FilesFrameError(f"a name must be 1..{MAX_NAME} bytes")
    if "\0" in name or "\\" in name:
        raise FilesFrameError("a name may not hold NUL or backslash")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise FilesFrameError(f"name {name!r}: empty, `.` and `..` components are refused (no absolute paths)")
        if len(part.encode()) > MAX_COMPONENT:
            raise FilesFrameError(f"name {name!r}: a component is longer than {MAX_COMPONENT} bytes")
    return name


def encode(frame: Frame) -> bytes:
    """The frame's bytes; FilesFrameError when it breaks a limit (so odyn never sends what the host refuses)."""
    check_name(frame.name)
    name = frame.name.encode()
    limit = MAX_IDENTITY if frame.kind == FILE else MAX_DATA
    if frame.kind not in (FILE, DATA):
        raise FilesFrameError(f"unknown frame kind {frame.kind}")
    if len(frame.payload) > limit or not 0 <= frame.offset <= MAX_OFFSET:
        raise FilesFrameError("payload or offset out of range")
    return HEADER.pack(frame.kind, len(name), frame.offset, len(frame.payload)) + name + frame.payload


def file_frame(name: str, identity: bytes, size: int) -> bytes:
    return encode(Frame(FILE, name, size, identity))


def data_frame(name: str, offset: int, data: bytes) -> bytes:
    return encode(Frame(DATA, name, offset, data))


class FilesDecoder:
    """Feed bytes, take frames. Holds at most one frame's worth of unparsed bytes plus what was fed."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Every frame `data` completes (FilesFrameError at the first bad one: use `push`/`next`
        to act on the good frames before it)."""
        self.push(data)
        frames = []
        while (frame := self.next()) is not None:
            frames.append(frame)
        return frames

    def push(self, data: bytes) -> None:
        self.buffer += data

    def next(self) -> Frame | None:
        """The next complete frame, None until one is, or FilesFrameError."""
        if len(self.buffer) < HEADER.size:
            return None
        kind, name_len, offset, size = HEADER.unpack_from(self.buffer)
        if kind not in (FILE, DATA):
            raise FilesFrameError(f"unknown frame kind {kind}")
        if not 0 < name_len <= MAX_NAME:
            raise FilesFrameError(f"name length {name_len} is not 1..{MAX_NAME}")
        if size > (MAX_IDENTITY if kind == FILE else MAX_DATA):
            raise FilesFrameError(f"payload of {size} bytes is over the limit")
        if offset > MAX_OFFSET or offset + size > MAX_OFFSET:
            raise FilesFrameError("offset out of range")
        end = HEADER.size + name_len + size
        if len(self.buffer) < end:
            return None
        raw_name = bytes(self.buffer[HEADER.size:HEADER.size + name_len])
        payload = bytes(self.buffer[HEADER.size + name_len:end])
        del self.buffer[:end]
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise FilesFrameError("a name is not UTF-8") from None
        return Frame(kind, check_name(name), offset, payload)

    def at_boundary(self) -> bool:
        """True when no partial frame is pending (an end-of-stream here is a clean end)."""
        return not self.buffer
