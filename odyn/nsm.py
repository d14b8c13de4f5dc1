"""The Nitro Secure Module device, `/dev/nsm`: one CBOR request in, one CBOR response out, per ioctl.

Only `GetRandom` is here (bring-up seeds the kernel's entropy with it); attestation joins in the
attestation issue. The request and response shapes are the NSM API's serde encodings
(aws-nitro-enclaves-nsm-api): a unit request is the CBOR text of its name, and a response is a
one-key map `{"GetRandom": {"random": bytes}}`, or `{"Error": "<code>"}`.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from typing import Protocol

DEVICE = "/dev/nsm"
# _IOWR(0x0A, 0, struct nsm_message), where nsm_message is two struct iovec (32 bytes on 64-bit).
NSM_IOCTL_REQUEST = (3 << 30) | (32 << 16) | (0x0A << 8) | 0
MAX_RESPONSE = 0x3000  # the driver's NSM_RESPONSE_MAX_SIZE


class NsmError(OSError):
    pass


class Nsm(Protocol):
    def request(self, body: bytes) -> bytes: ...


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Message(ctypes.Structure):
    _fields_ = [("request", _Iovec), ("response", _Iovec)]


class NsmDevice:
    """The kernel driver's interface. ctypes because the message holds pointers to buffers."""

    def __init__(self, path: str = DEVICE) -> None:
        self.path = path

    def request(self, body: bytes) -> bytes:
        request = ctypes.create_string_buffer(body, len(body))
        response = ctypes.create_string_buffer(MAX_RESPONSE)
        message = _Message(_Iovec(ctypes.addressof(request), len(body)),
                           _Iovec(ctypes.addressof(response), MAX_RESPONSE))
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, NSM_IOCTL_REQUEST, message)
        finally:
            os.close(fd)
        return response.raw[: message.response.len]


GET_RANDOM = b"\x69GetRandom"  # CBOR text string of length 9


def get_random(nsm: Nsm) -> bytes:
    """Random bytes from the NSM's hardware source; raises NsmError on an error or odd answer."""
    import cbor2  # only when an NSM is present; keeps the import cost off every other start

    try:
        answer = cbor2.loads(nsm.request(GET_RANDOM))
    except (ValueError, cbor2.CBORDecodeError) as e:
        raise NsmError(f"the NSM's GetRandom answer is not CBOR: {e}") from None
    if isinstance(answer, dict) and isinstance(answer.get("GetRandom"), dict):
        random = answer["GetRandom"].get("random")
        if isinstance(random, bytes) and random:
            return random
    raise NsmError(f"the NSM answered GetRandom with {answer!r:.200}")
