"""odyn's NSM client: typed calls over a channel, limits checked before the channel is called, the
/dev/nsm ioctl against a fake kernel (there is no /dev/nsm here), and the simulator's socket framing."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from enclaver_rules.attestation import nsm_messages as m
from enclaver_rules.attestation.nsm_messages import ErrorCode
from odyn import nsm
from odyn.nsm import NsmClient, NsmDevice, NsmError, NsmSocket, open_nsm

PCR = b"\x07" * 48


class FakeChannel:
    def __init__(self, *answers: object) -> None:
        self.answers = [a if isinstance(a, bytes) else cbor2.dumps(a) for a in answers]
        self.requests: list[bytes] = []

    def request(self, body: bytes) -> bytes:
        self.requests.append(body)
        return self.answers.pop(0)


def test_each_call_sends_its_request_and_types_the_answer() -> None:
    channel = FakeChannel(
        {"DescribeNSM": {"version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": "i-0-enc0",
                         "max_pcrs": 32, "locked_pcrs": [15, 0, 1], "digest": "SHA384"}},
        {"DescribePCR": {"lock": True, "data": PCR}}, {"ExtendPCR": {"data": PCR}}, "LockPCR", "LockPCRs",
        {"Attestation": {"document": b"doc"}}, {"GetRandom": {"random": b"r" * 256}})
    client = NsmClient(channel)
    description = client.describe_nsm()
    assert description.locked_pcrs == (0, 1, 15) and description.max_pcrs == 32 and description.digest == "SHA384"
    assert client.describe_pcr(4) == m.PcrState(True, PCR)
    assert client.extend_pcr(16, b"abc") == PCR
    assert client.lock_pcr(16) is None and client.lock_pcrs(32) is None
    assert client.attestation(nonce=b"n") == b"doc"
    assert client.get_random() == b"r" * 256
    assert [cbor2.loads(r) for r in channel.requests] == [
        "DescribeNSM", {"DescribePCR": {"index": 4}}, {"ExtendPCR": {"index": 16, "data": b"abc"}},
        {"LockPCR": {"index": 16}}, {"LockPCRs": {"range": 32}},
        {"Attestation": {"user_data": None, "nonce": b"n", "public_key": None}}, "GetRandom"]


@pytest.mark.parametrize(("call", "field"), [
    (lambda c: c.attestation(user_data=b"u" * 1025), "user_data"),
    (lambda c: c.attestation(nonce=b"n" * 1025), "nonce"),
    (lambda c: c.attestation(public_key=b"k" * 1025), "public_key"),
    (lambda c: c.extend_pcr(16, b"d" * (m.EXTEND_DATA_MAX + 1)), "data"),
    (lambda c: c.describe_pcr(32), "index"),
    (lambda c: c.lock_pcrs(33), "range"),
])
def test_limits_are_checked_before_the_channel_is_called(call: Callable[[NsmClient], Any], field: str) -> None:
    channel = FakeChannel()
    with pytest.raises(NsmError, match=rf"\.{field} "):
        call(NsmClient(channel))
    assert channel.requests == []


def test_an_error_answer_is_an_nsm_error_and_an_os_error() -> None:
    with pytest.raises(OSError, match="answered ExtendPCR with Error ReadOnlyIndex: the PCR is locked") as e:
        NsmClient(FakeChannel({"Error": "ReadOnlyIndex"})).extend_pcr(0, b"x")
    assert isinstance(e.value, NsmError) and e.value.code is ErrorCode.READ_ONLY_INDEX


def test_get_random_keeps_its_old_signature() -> None:
    channel = FakeChannel({"GetRandom": {"random": b"\x42" * 256}})
    assert nsm.get_random(channel) == b"\x42" * 256


def test_calls_are_serialized() -> None:
    """The ioctl blocks and asyncio callers use threads: one request at a time per client."""
    inside, overlap = [0], [False]

    class Slow:
        def request(self, body: bytes) -> bytes:
            inside[0] += 1
            overlap[0] |= inside[0] > 1
            time.sleep(0.01)
            inside[0] -= 1
            return cbor2.dumps({"GetRandom": {"random": b"r"}})

    client = NsmClient(Slow())
    threads = [threading.Thread(target=client.get_random) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap[0]


# --- /dev/nsm against a fake kernel ---------------------------------------------------------------


class FakeKernel:
    """Does what drivers/misc/nsm.c does with the message: reads the request, copies at most
    response.len bytes of the answer, writes the length it copied back into the struct."""

    def __init__(self, answer: bytes = b"", fail: int = 0) -> None:
        self.answer, self.fail = answer, fail
        self.seen: list[tuple[int, bytes]] = []

    def ioctl(self, fd: int, request: int, message: Any) -> int:
        os.fstat(fd)  # a real, open descriptor
        self.seen.append((request, ctypes.string_at(message.request.base, message.request.len)))
        if self.fail:
            raise OSError(self.fail, os.strerror(self.fail))
        n = min(len(self.answer), message.response.len)
        ctypes.memmove(message.response.base, self.answer, n)
        message.response.len = n
        return 0


@pytest.fixture
def device(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "nsm"
    path.write_bytes(b"")
    yield str(path)


def test_the_device_speaks_the_drivers_ioctl(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(cbor2.dumps({"DescribePCR": {"lock": False, "data": PCR}}))
    monkeypatch.setattr(nsm.fcntl, "ioctl", kernel.ioctl)
    assert NsmClient(NsmDevice(device)).describe_pcr(16) == m.PcrState(False, PCR)
    assert kernel.seen == [(0xC0200A00, m.encode_request(m.DescribePcr(16)))]


def test_the_device_reads_back_the_length_the_kernel_wrote(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    big = cbor2.dumps({"Attestation": {"document": b"d" * 9000}})
    monkeypatch.setattr(nsm.fcntl, "ioctl", FakeKernel(big).ioctl)
    assert NsmDevice(device).request(b"\x69GetRandom") == big


@pytest.mark.parametrize(("errno_", "code", "text"), [
    (errno.EMSGSIZE, ErrorCode.INPUT_TOO_LARGE, "larger than the driver's 4096-byte limit"),
    (errno.EINVAL, ErrorCode.INVALID_ARGUMENT, "refused the ioctl"),
    (errno.ETIMEDOUT, ErrorCode.INTERNAL_ERROR, "did not answer within"),
    (errno.EFAULT, ErrorCode.INTERNAL_ERROR, "could not read or write"),
    (errno.EIO, ErrorCode.INTERNAL_ERROR, "Input/output error"),
])
def test_ioctl_errors_are_explained(device: str, monkeypatch: pytest.MonkeyPatch, errno_: int, code: ErrorCode,
                                    text: str) -> None:
    monkeypatch.setattr(nsm.fcntl, "ioctl", FakeKernel(fail=errno_).ioctl)
    with pytest.raises(NsmError, match=text) as e:
        NsmClient(NsmDevice(device)).get_random()
    assert e.value.code is code and errno.errorcode[errno_] in str(e.value)


def test_a_request_over_the_limit_never_reaches_the_kernel(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel()
    monkeypatch.setattr(nsm.fcntl, "ioctl", kernel.ioctl)
    with pytest.raises(NsmError, match="at most 4096") as e:
        NsmDevice(device).request(b"x" * 4097)
    assert kernel.seen == [] and e.value.code is ErrorCode.INPUT_TOO_LARGE


def test_no_device_says_where_to_look(tmp_path: Path) -> None:
    with pytest.raises(NsmError, match="no such device: not in a Nitro Enclave"):
        NsmDevice(str(tmp_path / "nsm")).request(b"\x69GetRandom")


# --- open_nsm ----------------------------------------------------------------------------------------


def test_open_nsm_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nsm, "DEVICE", "/nonexistent/nsm")
    assert open_nsm("auto") is None and open_nsm("none") is None
    client = open_nsm("unix:/run/nsm.sock")
    assert client is not None and isinstance(client.channel, NsmSocket) and client.channel.path == "/run/nsm.sock"
    client = open_nsm("device:/dev/other")
    assert client is not None and isinstance(client.channel, NsmDevice) and client.channel.path == "/dev/other"
    monkeypatch.setattr(nsm, "DEVICE", "/dev/null")
    client = open_nsm("auto")
    assert client is not None and isinstance(client.channel, NsmDevice)
    for bad in ("vsock:3", "unix:", "device:", ""):
        with pytest.raises(ValueError, match="unknown NSM"):
            open_nsm(bad)


# --- the socket's framing against scripted servers (the real server: test_sim_nsm) -------------------


def _server(path: str, script: Callable[[socket.socket], None]) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                script(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _read_frame(conn: socket.socket) -> bytes:
    (n,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
    return conn.recv(n, socket.MSG_WAITALL)


def test_socket_frames_are_length_prefixed(tmp_path: Path) -> None:
    path, seen = str(tmp_path / "nsm.sock"), []
    answer = cbor2.dumps({"GetRandom": {"random": b"r" * 256}})

    def script(conn: socket.socket) -> None:
        seen.append(_read_frame(conn))
        conn.sendall(struct.pack(">I", len(answer)) + answer)

    thread = _server(path, script)
    assert NsmClient(NsmSocket(path)).get_random() == b"r" * 256
    thread.join(5)
    assert seen == [b"\x69GetRandom"]


@pytest.mark.parametrize(("reply", "text"), [
    (struct.pack(">I", m.RESPONSE_MAX + 1), "announced a 12289-byte answer"),
    (struct.pack(">I", 10) + b"abc", "closed the connection 3 bytes into a 10-byte read"),
    (b"\x00\x00", "closed the connection 2 bytes into a 4-byte read"),
])
def test_bad_frames_are_refused(tmp_path: Path, reply: bytes, text: str) -> None:
    path = str(tmp_path / "nsm.sock")

    def script(conn: socket.socket) -> None:
        _read_frame(conn)
        conn.sendall(reply)

    thread = _server(path, script)
    with pytest.raises(NsmError, match=text):
        NsmSocket(path).request(b"\x69GetRandom")
    thread.join(5)


def test_a_silent_server_times_out(tmp_path: Path) -> None:
    path, done = str(tmp_path / "nsm.sock"), threading.Event()
    thread = _server(path, lambda conn: done.wait(5))
    with pytest.raises(NsmError, match=r"did not answer within 0\.2 s"):
        NsmSocket(path, timeout=0.2).request(b"\x69GetRandom")
    done.set()
    thread.join(5)


def test_no_simulator_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(NsmError, match=r"no simulated NSM listens at .*enclaver attestation sim-nsm"):
        NsmSocket(str(tmp_path / "absent.sock")).request(b"\x69GetRandom")
