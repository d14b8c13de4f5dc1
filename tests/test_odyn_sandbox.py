"""No bypass: the seccomp program read back by an independent BPF interpreter, and a real app under
odyn whose own vsock socket is refused while odyn's vsock listeners work."""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from odyn import sandbox

ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000


def interpret(program: list[bytes], nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """Classic BPF, just the instructions a seccomp filter of this shape may use; written from
    linux/filter.h and Documentation/networking/filter.rst, not from the module under test."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    acc, pc = 0, 0
    for _ in range(1000):
        code, jt, jf, k = struct.unpack("<HBBI", program[pc])
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35):  # jeq / jge #k
            taken = acc == k if code == 0x15 else acc >= k
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")
    raise AssertionError("the program does not terminate")


X86, ARM, I386 = 0xC000003E, 0xC00000B7, 0x40000003


def test_vsock_sockets_are_refused_with_eacces_on_both_abis() -> None:
    for abi in (sandbox.X86_64, sandbox.AARCH64):
        program = sandbox.program(abi)
        assert interpret(program, abi.socket, abi.audit_arch, (40, 1, 0, 0, 0, 0)) == RET_ERRNO | errno.EACCES
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_NETLINK):
            assert interpret(program, abi.socket, abi.audit_arch, (family, 1, 0, 0, 0, 0)) == ALLOW
        for nr in abi.refused:
            assert interpret(program, nr, abi.audit_arch) == RET_ERRNO | errno.EPERM


def test_foreign_abis_get_nothing() -> None:
    program = sandbox.program(sandbox.X86_64)
    assert interpret(program, 102, I386, (1, 0, 0, 0, 0, 0)) == RET_ERRNO | errno.EPERM  # i386 socketcall
    assert interpret(program, 41 | 0x40000000, X86, (40, 1, 0, 0, 0, 0)) == RET_ERRNO | errno.EPERM  # x32 socket
    assert interpret(program, 41, ARM, (40, 1, 0, 0, 0, 0)) == RET_ERRNO | errno.EPERM


@given(st.integers(0, 1000), st.integers(0, 2**64 - 1))
def test_every_other_syscall_is_allowed(nr: int, arg0: int) -> None:
    abi = sandbox.X86_64
    expected = ALLOW
    if nr in abi.refused or (nr == abi.socket and arg0 & 0xFFFFFFFF == 40):
        expected = RET_ERRNO | (errno.EPERM if nr in abi.refused else errno.EACCES)
    assert interpret(sandbox.program(abi), nr, abi.audit_arch, (arg0, 0, 0, 0, 0, 0)) == expected


PROBE = r"""
import os, socket, sys, time
out = open(sys.argv[1], "w")
try:
    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    out.write("vsock: allowed\n")
except OSError as e:
    out.write(f"vsock: {e.errno}\n")
try:
    open(f"/proc/{os.getppid()}/mem", "rb")
    out.write("odyn memory: readable\n")
except OSError as e:
    out.write(f"odyn memory: {e.errno}\n")
out.close()
os.rename(sys.argv[1], sys.argv[1] + ".done")
time.sleep(float(sys.argv[2]))
"""


def test_the_apps_vsock_socket_is_refused_while_odyns_listeners_work(tmp_path: Path) -> None:
    """odyn on the real AF_VSOCK transport (this VM has vsock, no loopback): it binds the status and
    log ports; the app it starts cannot even create a vsock socket, nor read odyn's memory."""
    report = tmp_path / "report"
    odyn = subprocess.Popen([sys.executable, "-m", "odyn", "--transport", "vsock", "--no-bootstrap",
                             "--linger", "0", "--", sys.executable, "-c", PROBE, str(report), "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = Path(f"{report}.done")
    deadline = time.monotonic() + 30
    while not done.exists():
        assert odyn.poll() is None, odyn.stdout.read() if odyn.stdout else b""
        assert time.monotonic() < deadline, "the app did not report"
        time.sleep(0.05)
    # While the app runs, odyn holds vsock port 17000: binding it again fails with EADDRINUSE.
    probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        probe.bind((socket.VMADDR_CID_ANY, 17000))
        held = False
    except OSError as e:
        held = e.errno == errno.EADDRINUSE
    finally:
        probe.close()
    assert held, "odyn's own vsock listener is not there"
    assert done.read_text() == f"vsock: {errno.EACCES}\nodyn memory: {errno.EACCES}\n"
    assert odyn.wait(30) == 0
