"""The two ramdisks nitro-cli puts in every EIF, entry by entry (../shared/reference/eif.md §7, §8).

Both are described as (entry, data) pairs so their size is known before a byte is written (the
EIF header needs it) and their bytes can stream straight into the EIF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from enclaver_rules.eif.cpio import CpioEntry, CpioWriter, archive_length, coalesce, encode_name
from enclaver_rules.eif.rootfs import NAME_MAX, PATH_MAX, Tree, shown
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
        text = repr(item) if len(item) <= 80 else repr(item[:80]) + "…"
        if "\n" in item or "\0" in item:
            raise InvalidInput(f"{text} contains a newline or NUL, which the enclave's init cannot read",
                               file="IMAGE", fix="remove newlines and NUL characters from the image's Cmd/Entrypoint/Env")
        if not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate, from a JSON escape such as "\ud800"
                raise InvalidInput(f"{text} is not valid Unicode (a lone surrogate escape)", file="IMAGE",
                                   fix="write the image's Cmd/Entrypoint/Env as UTF-8 text") from None
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
        _check_path(full)
        if name == "etc/hosts":
            add(full, "file", node.mode, LINUXKIT_MTIME, uid=node.uid, gid=node.gid, data=HOSTS)
        elif name == "etc/resolv.conf":
            add(full, "symlink", node.mode, LINUXKIT_MTIME, uid=node.uid, gid=node.gid, data=RESOLV_SYMLINK.encode())
        elif item.hardlink_to is not None:
            # linuxkit turns hard links into symlinks relative to the link's directory (initrd.go typeconv)
            target = _relative(PREFIX + item.hardlink_to, full)
            add(full, "symlink", node.mode, mtime, uid=node.uid, gid=node.gid, data=encode_name(target))
        elif node.kind == "dir":
            add(full, "dir", node.mode, mtime, uid=node.uid, gid=node.gid)
        elif node.kind == "file":
            add(full, "file", node.mode, mtime, uid=node.uid, gid=node.gid, size=node.size,
                source=lambda node=node: tree.read(node))  # type: ignore[misc]
        elif node.kind == "symlink":
            add(full, "symlink", node.mode, mtime, uid=node.uid, gid=node.gid, data=encode_name(node.linkname))
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


def _check_path(full: str) -> None:
    """A path the enclave's kernel can unpack: the layers' names were checked one by one, but a
    directory reached through a symbolic link, or made for a path's parents, can go deeper."""
    raw = encode_name(full)
    if len(raw) + 1 > PATH_MAX:
        raise InvalidInput(f"{shown(full[len(PREFIX):])} is {len(raw) - len(PREFIX)} bytes long: the enclave's kernel "
                           f"unpacks paths of at most {PATH_MAX - len(PREFIX) - 1}", file="IMAGE",
                           fix="shorten the image's deepest paths (deep directories or long names)")
    if max(len(part) for part in raw.split(b"/")) > NAME_MAX:
        raise InvalidInput(f"{shown(full[len(PREFIX):])} has a name component over {NAME_MAX} bytes", file="IMAGE",
                           fix="rename it in the image: Linux allows at most 255 bytes per name")


def _relative(target: str, link: str) -> str:
    """Go's filepath.Rel(filepath.Dir(link), target) for clean relative paths."""
    base = [p for p in link.split("/")[:-1] if p]
    dest = [p for p in target.split("/") if p]
    common = 0
    while common < min(len(base), len(dest)) and base[common] == dest[common]:
        common += 1
    return "/".join([".."] * (len(base) - common) + dest[common:]) or "."
