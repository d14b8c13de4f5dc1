"""The Nitro Secure Module: typed requests over `/dev/nsm`, or over a socket to the simulated NSM.

One client (`NsmClient`), two channels that move the same CBOR bytes (`request(body) -> bytes`):
`NsmDevice`, the kernel driver's ioctl inside an enclave, and `NsmSocket`, a Unix stream socket to
the simulated NSM the host serves (`enclaver attestation sim-nsm`; its CA keys stay on the host).
`open_nsm(spec)` picks one. The messages themselves are `enclaver_rules.attestation.nsm_messages`,
shared with the simulator; every limit is checked there, before a channel is called.

Socket framing, both ways: a 4-byte big-endian length, then that many bytes of the CBOR the ioctl
would carry. One request and one response per connection.

The ioctl blocks (the driver waits up to two minutes for the NSM): asyncio callers use
`asyncio.to_thread`, and a client's calls are serialized by its lock.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from typing import Protocol

from enclaver_rules.attestation import nsm_messages as msg
from enclaver_rules.attestation.nsm_messages import (
    ErrorCode,
    NsmDescription,
    NsmError,
    PcrState,
)

__all__ = ["DEVICE", "Channel", "Nsm", "NsmClient", "NsmDevice", "NsmError", "NsmSocket", "get_random", "open_nsm"]

DEVICE = "/dev/nsm"
# _IOWR(0x0A, 0, struct nsm_message), where nsm_message is two struct iovec (32 bytes on 64-bit).
NSM_IOCTL_REQUEST = (3 << 30) | (32 << 16) | (0x0A << 8) | 0
MAX_RESPONSE = msg.RESPONSE_MAX  # the driver's NSM_RESPONSE_MAX_SIZE
SOCKET_TIMEOUT = 30.0  # seconds, for each step of an exchange with the simulated NSM
FRAME = struct.Struct(">I")


class Channel(Protocol):
    """Moves one request's bytes to the NSM and returns its answer's bytes."""

    def request(self, body: bytes) -> bytes: ...


Nsm = Channel  # the name bring-up knew


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Message(ctypes.Structure):
    _fields_ = [("request", _Iovec), ("response", _Iovec)]


_IOCTL_ERRORS = {
    errno.EMSGSIZE: (f"the request is larger than the driver's {msg.REQUEST_MAX}-byte limit",
                     ErrorCode.INPUT_TOO_LARGE),
    errno.EINVAL: ("the driver refused the ioctl (wrong command or message size): is this the Nitro Secure "
                   "Module's driver, and a 64-bit enclave?", ErrorCode.INVALID_ARGUMENT),
    errno.ETIMEDOUT: ("the NSM did not answer within the driver's two minutes: the enclave's NSM is unhealthy",
                      ErrorCode.INTERNAL_ERROR),
    errno.EFAULT: ("the driver could not read or write the message's buffers (a bug in this client)",
                   ErrorCode.INTERNAL_ERROR),
}


class NsmDevice:
    """The kernel driver's interface. ctypes because the message holds pointers to buffers."""

    def __init__(self, path: str = DEVICE) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"NsmDevice({self.path!r})"

    def request(self, body: bytes) -> bytes:
        if len(body) > msg.REQUEST_MAX:
            raise NsmError(f"the request is {len(body)} bytes: the NSM takes at most {msg.REQUEST_MAX}",
                           code=ErrorCode.INPUT_TOO_LARGE)
        request = ctypes.create_string_buffer(body, len(body))
        response = ctypes.create_string_buffer(MAX_RESPONSE)
        message = _Message(_Iovec(ctypes.addressof(request), len(body)),
                           _Iovec(ctypes.addressof(response), MAX_RESPONSE))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NsmError(f"{self.path}: no such device: not in a Nitro Enclave, or the nsm driver is not loaded "
                           f"(outside an enclave, use the simulated NSM: unix:PATH)") from None
        except PermissionError as e:
            raise NsmError(f"{self.path}: {e.strerror}: the NSM device needs read and write access") from None
        try:
            fcntl.ioctl(fd, NSM_IOCTL_REQUEST, message)
        except OSError as e:
            text, code = _IOCTL_ERRORS.get(e.errno or 0, (e.strerror or str(e), ErrorCode.INTERNAL_ERROR))
            raise NsmError(f"{self.path}: {text} (errno {errno.errorcode.get(e.errno or 0, e.errno)})",
                           code=code) from None
        finally:
            os.close(fd)
        length = message.response.len  # the kernel writes back how much it wrote
        if length > MAX_RESPONSE:  # it copies at most the buffer: never, unless the driver changed
            raise NsmError(f"{self.path}: the NSM's answer is {length} bytes, over the {MAX_RESPONSE}-byte buffer",
                           code=ErrorCode.BUFFER_TOO_SMALL)
        return response.raw[:length]


class NsmSocket:
    """The simulated NSM's Unix socket: length-prefixed frames, one exchange per connection, every
    step bounded by `timeout` and every read by the API's limits."""

    def __init__(self, path: str, timeout: float = SOCKET_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"NsmSocket({self.path!r})"

    def request(self, body: bytes) -> bytes:
        if len(body) > msg.REQUEST_MAX:
            raise NsmError(f"the request is {len(body)} bytes: the NSM takes at most {msg.REQUEST_MAX}",
                           code=ErrorCode.INPUT_TOO_LARGE)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise NsmError(f"no simulated NSM listens at {self.path}: start one with `enclaver attestation "
                               f"sim-nsm --socket {self.path} …`") from None
            except OSError as e:
                raise NsmError(f"{self.path}: cannot reach the simulated NSM: {e.strerror or e}") from None
            try:
                sock.sendall(FRAME.pack(len(body)) + body)
                (length,) = FRAME.unpack(_read_exactly(sock, FRAME.size, self.path))
                if length > MAX_RESPONSE:
                    raise NsmError(f"{self.path}: the simulated NSM announced a {length}-byte answer, over the "
                                   f"{MAX_RESPONSE}-byte limit", code=ErrorCode.INVALID_RESPONSE)
                return _read_exactly(sock, length, self.path)
            except TimeoutError:
                raise NsmError(f"{self.path}: the simulated NSM did not answer within {self.timeout:g} s",
                               code=ErrorCode.INTERNAL_ERROR) from None
            except OSError as e:
                if isinstance(e, NsmError):
                    raise
                raise NsmError(f"{self.path}: the exchange with the simulated NSM failed: {e.strerror or e}",
                               code=ErrorCode.INTERNAL_ERROR) from None


def _read_exactly(sock: socket.socket, size: int, path: str) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 65536))
        if not chunk:
            raise NsmError(f"{path}: the simulated NSM closed the connection {size - left} bytes into a "
                           f"{size}-byte read", code=ErrorCode.INVALID_RESPONSE)
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class NsmClient:
    """The NSM API, typed, over one channel. Thread-safe: calls are serialized (the ioctl blocks;
    asyncio code calls these through `asyncio.to_thread`). Every error is an NsmError."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"NsmClient({self.channel!r})"

    def _call(self, request: msg.Request) -> msg.Response:
        body = msg.encode_request(request)  # limits checked before the channel is touched
        with self._lock:
            answer = self.channel.request(body)
        return msg.decode_response(request, answer)

    def describe_nsm(self) -> NsmDescription:
        result = self._call(msg.DescribeNsm())
        assert isinstance(result, NsmDescription)
        return result

    def describe_pcr(self, index: int) -> PcrState:
        result = self._call(msg.DescribePcr(index))
        assert isinstance(result, PcrState)
        return result

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR `index` with `data`; returns the register's new value."""
        result = self._call(msg.ExtendPcr(index, data))
        assert isinstance(result, msg.ExtendedPcr)
        return result.data

    def lock_pcr(self, index: int) -> None:
        self._call(msg.LockPcr(index))

    def lock_pcrs(self, count: int) -> None:
        """Lock PCRs [0, count) (the API calls it `range`)."""
        self._call(msg.LockPcrs(count))

    def attestation(self, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes:
        """A signed attestation document (COSE_Sign1 bytes, as the NSM made them)."""
        result = self._call(msg.Attestation(user_data, nonce, public_key))
        assert isinstance(result, msg.AttestationDocument)
        return result.document

    def get_random(self) -> bytes:
        result = self._call(msg.GetRandom())
        assert isinstance(result, msg.RandomBytes)
        return result.random


def valid_spec(spec: str) -> bool:
    """Whether `open_nsm` understands `spec` (checked when odyn's arguments are parsed)."""
    return spec in ("auto", "none", "device") or any(
        spec.startswith(p) and len(spec) > len(p) for p in ("device:", "unix:"))


def open_nsm(spec: str) -> NsmClient | None:
    """`auto`: the device if /dev/nsm exists, else None; `none`: None; `device` or `device:PATH`;
    `unix:PATH`: the simulated NSM's socket. ValueError for anything else."""
    if spec == "auto":
        return NsmClient(NsmDevice()) if os.path.exists(DEVICE) else None
    if spec == "none":
        return None
    if spec == "device":
        return NsmClient(NsmDevice())
    if spec.startswith("device:") and len(spec) > len("device:"):
        return NsmClient(NsmDevice(spec[len("device:"):]))
    if spec.startswith("unix:") and len(spec) > len("unix:"):
        return NsmClient(NsmSocket(spec[len("unix:"):]))
    raise ValueError(f"unknown NSM {spec!r}: use auto, none, device, device:PATH or unix:PATH")


def get_random(nsm: Channel) -> bytes:
    """Random bytes from the NSM's hardware source; raises NsmError on an error or odd answer."""
    return NsmClient(nsm).get_random()
