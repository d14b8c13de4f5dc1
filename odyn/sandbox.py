"""No bypass: the app cannot talk over vsock itself, so every byte in or out passes odyn's checks.

The enclave's only link to the world is vsock. If the app could open an AF_VSOCK socket it could
reach the parent directly and skip the egress policy, so before the app is exec'd we install a
seccomp filter (inherited by every descendant, impossible to remove) that refuses:

- `socket(AF_VSOCK, …)` with EACCES;
- `io_uring_setup`: io_uring's IORING_OP_SOCKET creates sockets without the socket syscall;
- `ptrace`, `process_vm_readv/writev`, `pidfd_getfd`: ways to act through odyn's process or
  steal its vsock descriptors;
- every syscall of a foreign ABI (x32, i386 on x86_64; arm32 on arm64), where `socketcall` and
  other numbers would slip past a filter written for the native one.

We chose seccomp over a separate network namespace because AF_VSOCK is not namespaced at all:
a new netns would not take vsock away. odyn also makes itself non-dumpable and drops
CAP_SYS_PTRACE from the app, so even a root app cannot open /proc/<odyn>/mem.

The program is built by a pure function (tests read it back); installing it needs prctl, which
the stdlib lacks, so it is ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

AF_VSOCK = 40

# BPF opcodes (linux/filter.h)
LD_W_ABS = 0x20   # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15      # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35      # BPF_JMP | BPF_JGE | BPF_K
RET_K = 0x06      # BPF_RET | BPF_K

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6] (little-endian here)
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16


@dataclass(frozen=True)
class Abi:
    name: str
    audit_arch: int
    socket: int
    refused: tuple[int, ...]  # io_uring_setup, ptrace, process_vm_readv, process_vm_writev, pidfd_getfd
    foreign_bit: int = 0      # x32 syscalls carry this bit in nr


X86_64 = Abi("x86_64", 0xC000003E, 41, (425, 101, 310, 311, 438), foreign_bit=0x40000000)
AARCH64 = Abi("aarch64", 0xC00000B7, 198, (425, 117, 270, 271, 438))
ABIS = {"x86_64": X86_64, "aarch64": AARCH64}


Target = int | str  # a relative jump, or a label


@dataclass(frozen=True)
class Insn:
    code: int
    k: int
    jt: Target = 0
    jf: Target = 0


def assemble(items: list[Insn | str]) -> list[bytes]:
    """A two-pass assembler for classic BPF: strings are labels naming the next instruction;
    jump targets may be labels (jumps only go forward in BPF, which this checks)."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in items:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = []
    for index, insn in enumerate(insns):
        jumps = []
        for target in (insn.jt, insn.jf):
            offset = labels[target] - index - 1 if isinstance(target, str) else target
            if not 0 <= offset <= 255:
                raise ValueError(f"BPF jump out of range at instruction {index}")
            jumps.append(offset)
        out.append(struct.pack("=HBBI", insn.code, jumps[0], jumps[1], insn.k))
    return out


def program(abi: Abi) -> list[bytes]:
    """The filter, one `struct sock_filter` per item: check the ABI, refuse foreign syscall
    numbers, refuse the listed syscalls, and for socket() look at the address family."""
    items: list[Insn | str] = [
        Insn(LD_W_ABS, OFF_ARCH),
        Insn(JEQ_K, abi.audit_arch, 0, "deny"),
        Insn(LD_W_ABS, OFF_NR),
    ]
    if abi.foreign_bit:
        items.append(Insn(JGE_K, abi.foreign_bit, "deny", 0))
    items.append(Insn(JEQ_K, abi.socket, "family", 0))
    items += [Insn(JEQ_K, nr, "deny", 0) for nr in abi.refused]
    items += [
        Insn(RET_K, SECCOMP_RET_ALLOW),
        "family", Insn(LD_W_ABS, OFF_ARG0),
        Insn(JEQ_K, AF_VSOCK, "vsock", 0),
        Insn(RET_K, SECCOMP_RET_ALLOW),
        "vsock", Insn(RET_K, SECCOMP_RET_ERRNO | errno.EACCES),
        "deny", Insn(RET_K, SECCOMP_RET_ERRNO | errno.EPERM),
    ]
    return assemble(items)


PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 38, 22, 4, 24
SECCOMP_MODE_FILTER = 2
CAP_SYS_PTRACE = 19


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def native_abi() -> Abi:
    machine = platform.machine()
    if machine not in ABIS:
        raise OSError(errno.ENOSYS, f"no vsock filter for {machine}; odyn supports {', '.join(ABIS)}")
    return ABIS[machine]


def protect_supervisor() -> None:
    """Make odyn non-dumpable: its memory and descriptors then need CAP_SYS_PTRACE to reach."""
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def confine_app() -> None:
    """Run in the forked child just before exec: drop CAP_SYS_PTRACE, then install the filter.
    Only async-signal-safe-ish work here (no locks), as it runs between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EPERM:
        _check(-1, "prctl(PR_CAPBSET_DROP)")  # EPERM: no CAP_SETPCAP, so nothing could raise it either
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    data = (_CapData * 2)()
    _check(libc.capget(ctypes.byref(header), data), "capget")
    for word in data:
        mask = ~(1 << CAP_SYS_PTRACE) & 0xFFFFFFFF
        word.effective &= mask
        word.permitted &= mask
        word.inheritable &= mask
    _check(libc.capset(ctypes.byref(header), data), "capset")
    filt = b"".join(program(native_abi()))
    buffer = ctypes.create_string_buffer(filt, len(filt))
    prog = _SockFprog(len(filt) // 8, ctypes.addressof(buffer))
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "prctl(PR_SET_SECCOMP)")
