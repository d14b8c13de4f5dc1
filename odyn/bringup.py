"""Enclave bring-up: what must hold before the app can run, done only where it is missing.

In a Nitro enclave the AWS init (PID 1) mounts /proc, /dev and /sys, then starts odyn as its
child; loopback is down, the hostname is the kernel's "(none)", and the kernel's entropy pool has
only what it gathered itself. Upstream odyn brings loopback up and feeds one NSM `GetRandom`
answer to /dev/random. We do the same, plus mount what is missing (odyn started some other way:
a bare VM, `unshare`, a test) and set the hostname to the manifest's name when the kernel has none,
so the app's logs and TLS libraries see something sensible.

Each step first checks whether it is needed, so in the simulator (a container that already has
all of it) bring-up changes nothing. The steps are small syscall wrappers; deciding what to do is
kept in pure functions so the tests can check the decisions without root.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    flags: int
    probe: str  # a path that exists once this file system is mounted


# The same flags as the Nitro init uses for these (aws-nitro-enclaves-sdk-bootstrap init/init.c).
MOUNTS = (
    Mount("proc", "/proc", "proc", MS_NODEV | MS_NOSUID | MS_NOEXEC, "/proc/self/stat"),
    Mount("sysfs", "/sys", "sysfs", MS_NODEV | MS_NOSUID | MS_NOEXEC, "/sys/kernel"),
    Mount("dev", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, "/dev/null"),
)
NO_HOSTNAME = ("", "(none)")  # the kernel's own default; anything else was chosen by someone


def missing_mounts(exists: Callable[[str], bool] = os.path.exists) -> list[Mount]:
    return [m for m in MOUNTS if not exists(m.probe)]


def needs_hostname(current: str) -> bool:
    return current.strip() in NO_HOSTNAME


def hostname_for(name: str) -> str:
    """The manifest's name as a hostname label: it already matches our name pattern, but the
    kernel limit is 64 bytes and a label may not end in '-'."""
    return name[:63].rstrip("-._") or "enclave"


def mount(m: Mount) -> None:
    """mount(2): the stdlib has no wrapper, so ctypes it is (the static binary bundles libc)."""
    os.makedirs(m.target, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(m.source.encode(), m.target.encode(), m.fstype.encode(), ctypes.c_ulong(m.flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {m.fstype} on {m.target}: {os.strerror(err)}")


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the union


def loopback_up(name: str = "lo") -> bool:
    """Bring `lo` up (the kernel then gives it 127.0.0.1/8 and ::1); True if it was down.
    Ingress, the egress proxy and the app's own listeners all live on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _, flags = _IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ.pack(name.encode(), 0)))
        if flags & IFF_UP:
            return False
        fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ.pack(name.encode(), flags | IFF_UP))
        return True


HOSTNAME_FILE = "/proc/sys/kernel/hostname"


def set_hostname(name: str, path: str = HOSTNAME_FILE) -> bool:
    """Write the hostname through procfs (no sethostname in the stdlib); True if it changed."""
    with open(path, encoding="ascii", errors="replace") as f:
        if not needs_hostname(f.read()):
            return False
    with open(path, "w", encoding="ascii") as f:
        f.write(hostname_for(name))
    return True


RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])


def entropy_request(seed: bytes) -> bytes:
    """struct rand_pool_info {int entropy_count (bits); int buf_size; u32 buf[]}, padded to u32.
    Unlike a plain write to /dev/random, the ioctl credits the entropy (needs CAP_SYS_ADMIN)."""
    padded = seed + b"\0" * (-len(seed) % 4)
    return struct.pack("=ii", len(seed) * 8, len(seed)) + padded


def add_entropy(seed: bytes, device: str = "/dev/random") -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, entropy_request(seed))
    finally:
        os.close(fd)


# -- the app's environment ------------------------------------------------------------------------

# The static binary's two loaders leave their own variables behind; the app must not see them.
LOADER_VARIABLES = ("STATICX_BUNDLE_DIR", "STATICX_PROG_PATH", "_MEIPASS2", "_PYI_ARCHIVE_FILE",
                    "_PYI_APPLICATION_HOME_DIR", "_PYI_PARENT_PROCESS_LEVEL", "_PYI_SPLASH_IPC",
                    "_PYI_LINUX_PROCESS_NAME", "PYINSTALLER_RESET_ENVIRONMENT")
APP_TMPDIR = "ODYN_APP_TMPDIR"  # see app_environment


def app_environment(env: dict[str, str]) -> dict[str, str]:
    """The image's environment as the app should see it, undoing what odyn's loaders changed.

    PyInstaller prepends its unpack directory to LD_LIBRARY_PATH and keeps the original in
    LD_LIBRARY_PATH_ORIG. The enclave image points TMPDIR at an executable directory for odyn's
    unpacking (the Nitro init mounts /tmp noexec) and keeps the app's own value in
    ODYN_APP_TMPDIR, empty meaning "unset".
    """
    out = {k: v for k, v in env.items() if k not in LOADER_VARIABLES}
    if "LD_LIBRARY_PATH_ORIG" in out:
        out["LD_LIBRARY_PATH"] = out.pop("LD_LIBRARY_PATH_ORIG")
    elif "_MEIPASS2" in env or "_PYI_ARCHIVE_FILE" in env:
        out.pop("LD_LIBRARY_PATH", None)
    if APP_TMPDIR in out:
        original = out.pop(APP_TMPDIR)
        if original:
            out["TMPDIR"] = original
        else:
            out.pop("TMPDIR", None)
    return out


# -- all of it ------------------------------------------------------------------------------------

def bring_up(random_source: Callable[[], bytes] | None) -> list[str]:
    """Mount what is missing, bring loopback up, seed entropy; returns what was done, for the log.
    Raises OSError when a needed step fails: the supervisor reports it as `fatal`."""
    done: list[str] = []
    for m in missing_mounts():
        mount(m)
        done.append(f"mounted {m.fstype} on {m.target}")
    if loopback_up():
        done.append("brought loopback up")
    if random_source is not None:
        seed = random_source()
        with contextlib.suppress(OSError):  # no CAP_SYS_ADMIN: still mix it in, uncredited
            add_entropy(seed)
            done.append(f"credited {len(seed)} bytes of NSM entropy")
            return done
        with open("/dev/random", "wb") as f:
            f.write(seed)
        done.append(f"mixed in {len(seed)} bytes of NSM entropy")
    return done
