"""The two ramdisks nitro-cli puts in every EIF, entry by entry (../shared/reference/eif.md §7, §8).

Both are described as (entry, data) pairs so their size is known before a byte is written (the
EIF header needs it) and their bytes can stream straight into the EIF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from enclaver_rules.eif.cpio import CpioEntry, CpioWriter, archive_length, coalesce
from enclaver_rules.eif.rootfs import Tree
from enclaver_rules.errors import InvalidInput

#: linuxkit's defaultModTime, 2017-04-18T16:30:00Z: every entry linuxkit makes carries it.
LINUXKIT_MTIME = 1492533000
PREFIX = "rootfs/"
RESOLV_SYMLINK = "/run/resolvconf/resolv.conf"
EXCLUDE = frozenset({".dockerenv", "Dockerfile", "dev/console", "dev/pts", "dev/shm", "etc/hostname"})
HOSTS = (b"127.0.0.1       localhost\n::1     localhost ip6-localhost ip6-loopback\nfe00::0 ip6-localnet\n"
         b"ff00::0 ip6-mcastprefix\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n")
#: (name, kind, mode, linkname, data) that must exist; their mtime is forced when the export has them.
TOUCH = {
    "dev/": ("dir", 0o755, "", b""), "dev/pts/": ("dir", 0o755, "", b""), "dev/shm/": ("dir", 0o755, "", b""),
    "etc/": ("dir", 0o755, "", b""), "etc/mtab": ("symlink", 0o755, "/proc/mounts", b""),
    "etc/resolv.conf": ("symlink", 0o644, RESOLV_SYMLINK, b""), "etc/hosts": ("file", 0o644, "", HOSTS),
    "proc/": ("dir", 0o755, "", b""), "sys/": ("dir", 0o755, "", b""),
}
ROOTFS_DIRS = ("dev", "run", "sys", "var", "proc", "tmp")

Data = Callable[[], Iterator[bytes]]


@dataclass(frozen=True, slots=True)
class Ramdisk:
    entries: tuple[tuple[CpioEntry, Data], ...]

    @property
    def size(self) -> int:
        return archive_length(e for e, _ in self.entries)

    def stream(self) -> Iterator[bytes]:
        """The archive's bytes, in pieces of about 256 KiB; nothing is held beyond one piece."""
        writer = CpioWriter()

        def parts() -> Iterator[bytes]:
            for entry, data in self.entries:
                yield from writer.entry(entry, data())
            yield from writer.trailer()

        return coalesce(parts())


def _bytes(data: bytes) -> Data:
    return lambda: iter([data]) if data else iter(())


def _file(path: Path) -> Data:
    def read() -> Iterator[bytes]:
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")
    return read


def bootstrap(init: Path, nsm: Path | None) -> Ramdisk:
    """`dev/`, `init`, `nsm.ko`: linuxkit's `files` entries, mode 0755, mtime LINUXKIT_MTIME."""
    entries: list[tuple[CpioEntry, Data]] = [(CpioEntry("dev", "dir", 0o755, mtime=LINUXKIT_MTIME), _bytes(b""))]
    for name, path in (("init", init), ("nsm.ko", nsm)):
        if path is None:
            continue
        entries.append((CpioEntry(name, "file", 0o755, mtime=LINUXKIT_MTIME, size=path.stat().st_size), _file(path)))
    return Ramdisk(tuple(entries))


def command_files(cmd: list[str], entrypoint: list[str], env: list[str]) -> tuple[bytes, bytes]:
    """nitro-cli's `cmd` and `env`: Cmd if set, else Entrypoint (never both); one line per item."""
    argv = cmd or entrypoint
    if not argv:
        raise InvalidInput("the image has neither Cmd nor Entrypoint", file="IMAGE",
                           fix="give the image an ENTRYPOINT or CMD: the enclave needs a program to run")
    for item in argv + env:
        if "\n" in item:
            raise InvalidInput(f"{item!r} contains a newline, which the enclave's init cannot read", file="IMAGE",
                               fix="remove newlines from the image's Cmd/Entrypoint/Env")
    return "".join(f"{a}\n" for a in argv).encode(), "".join(f"{e}\n" for e in env).encode()


def customer(tree: Tree, cmd: bytes, env: bytes) -> Ramdisk:
    """ramdisk #1: `rootfs` + the filtered export under it + linuxkit's own files, in nitro-cli's order."""
    entries: list[tuple[CpioEntry, Data]] = []

    def add(name: str, kind: str, mode: int, mtime: int, *, uid: int = 0, gid: int = 0, data: bytes | None = None,
            source: Data | None = None, size: int = 0, rdev: tuple[int, int] = (0, 0)) -> None:
        if data is not None:
            size, source = len(data), _bytes(data)
        entries.append((CpioEntry(name, kind, mode, uid, gid, mtime, size, *rdev), source or _bytes(b"")))

    add("rootfs", "dir", 0o755, LINUXKIT_MTIME)
    found: set[str] = set()
    for item in tree.export():
        name, node = item.name, item.node
        if name in EXCLUDE:
            continue
        if name in TOUCH:
            found.add(name)
        mtime = LINUXKIT_MTIME if name in TOUCH else node.mtime
        full = PREFIX + name
        if name == "etc/hosts":
            add(full, "file", node.mode, LINUXKIT_MTIME, uid=node.uid, gid=node.gid, data=HOSTS)
        elif name == "etc/resolv.conf":
            add(full, "symlink", node.mode, LINUXKIT_MTIME, uid=node.uid, gid=node.gid, data=RESOLV_SYMLINK.encode())
        elif item.hardlink_to is not None:
            # linuxkit turns hard links into symlinks relative to the link's directory (initrd.go typeconv)
            target = _relative(PREFIX + item.hardlink_to, full)
            add(full, "symlink", node.mode, mtime, uid=node.uid, gid=node.gid, data=target.encode())
        elif node.kind == "dir":
            add(full, "dir", node.mode, mtime, uid=node.uid, gid=node.gid)
        elif node.kind == "file":
            add(full, "file", node.mode, mtime, uid=node.uid, gid=node.gid, size=node.size,
                source=lambda node=node: tree.read(node))  # type: ignore[misc]
        elif node.kind == "symlink":
            add(full, "symlink", node.mode, mtime, uid=node.uid, gid=node.gid, data=node.linkname.encode())
        else:
            add(full, node.kind, node.mode, mtime, uid=node.uid, gid=node.gid, rdev=(node.devmajor, node.devminor))
    for name in sorted(TOUCH):
        if name not in found:
            kind, mode, link, data = TOUCH[name]
            add(PREFIX + name.rstrip("/"), kind, mode, LINUXKIT_MTIME, data=link.encode() if link else data)
    add("rootfs", "dir", 0o755, LINUXKIT_MTIME)
    for d in ROOTFS_DIRS:
        add(PREFIX + d, "dir", 0o755, LINUXKIT_MTIME)
    add("cmd", "file", 0o644, LINUXKIT_MTIME, data=cmd)
    add("env", "file", 0o644, LINUXKIT_MTIME, data=env)
    return Ramdisk(tuple(entries))


def _relative(target: str, link: str) -> str:
    """Go's filepath.Rel(filepath.Dir(link), target) for clean relative paths."""
    base = [p for p in link.split("/")[:-1] if p]
    dest = [p for p in target.split("/") if p]
    common = 0
    while common < min(len(base), len(dest)) and base[common] == dest[common]:
        common += 1
    return "/".join([".."] * (len(base) - common) + dest[common:]) or "."
