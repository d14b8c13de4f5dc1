"""An image's merged file system as metadata, in the order and shape `docker export` gives it.

The customer ramdisk must equal what nitro-cli gets from `docker create` + `docker export` of the
image, filtered by linuxkit. We emulate that without an engine and without unpacking to disk:
each layer's tar is read once; for every file we keep its metadata and where its bytes sit in
the (uncompressed) layer, so the ramdisk writer can read them in export order later. Memory
grows with the number of entries, never with their size.

Emulated from the sources in ../shared/reference/eif.md §8:
* overlay semantics: the topmost layer's entry wins; `.wh.NAME` and opaque directories hide
  lower entries; a hard link shares its target's bytes and inode, and its header's mode, owner
  and mtime apply to that inode; a symlink's mode is 0777 (what lstat reports on Linux);
* Docker's init layer on top (moby `daemon/initlayer`, run over the image's own tree): for each
  of its paths, every component that is not a directory is unlinked; what is then missing is
  created, directories 0755 and empty files 0755, owned by root. A directory the image already
  has keeps its mode and owner (Debian's 0555 `proc` and `sys` stay 0555);
* export walk order: `filepath.WalkDir` (each directory's entries sorted by name, depth first),
  directories named with a trailing `/`; the first path of an inode is the file, later paths
  are hard links to it.

Layers are hostile input. Names are kept as the bytes the tar holds (UTF-8, anything else
through surrogate escapes, so the ramdisk gets the same bytes `docker export` gives). What a
newc archive or the enclave's kernel cannot hold is refused with an `InvalidInput` naming the
layer and the entry: a NUL in a name, a name component over NAME_MAX (255) bytes, a path over
PATH_MAX (4096), a number (uid, gid, mtime, size, device) over 32 bits, a sparse file. Memory and
time are bounded: extended tar headers are capped, the tree holds at most MAX_NODES nodes, each
path resolution walks at most MAX_LOOKUP_STEPS components and the whole image MAX_TOTAL_STEPS,
and nothing recurses per directory level (a 2,000-deep tree is walked like a flat one).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from enclaver_rules.eif.layercheck import LayerChecks
from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci.flatten import OPAQUE, WHITEOUT, UnsafeLayer

CHUNK = 4 << 20  # big reads: fewer hand-offs to the hashing threads
MAX_SYMLINKS = 40
#: Linux's limits: a name component, and a whole path with its NUL (a longer cpio name is
#: skipped by the kernel's initramfs unpacker, a longer component cannot be created).
NAME_MAX = 255
PATH_MAX = 4096
#: newc stores every number as 8 hex digits.
U32 = 0xFFFF_FFFF
#: Nodes built for one image (about 360 bytes each, so under 1 GB); real images have far fewer.
MAX_NODES = 2_000_000
#: Components walked to resolve one path, symbolic links included (a PATH_MAX path has at most
#: 2,048), and for the whole image: a bound on the time a hostile tree of links can cost.
MAX_LOOKUP_STEPS = 4096
MAX_TOTAL_STEPS = 100_000_000
#: One PAX or GNU long-name header, all global PAX headers together, and extended headers in a row.
MAX_EXTENDED_HEADER = 1 << 20
MAX_GLOBAL_HEADERS = 16 << 10
MAX_HEADER_CHAIN = 8
#: What tarfile raises on a hostile archive: its own errors, and ValueErrors from numbers it
#: parses without checking (GNU sparse maps in PAX records).
TAR_ERRORS = (tarfile.TarError, ValueError, OverflowError, LookupError, EOFError)
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)
#: Docker's init layer (moby daemon/initlayer/setup_unix.go): path → "dir", "file" or a symlink's target.
INIT_LAYER = (("dev/pts", "dir"), ("dev/shm", "dir"), ("proc", "dir"), ("sys", "dir"), (".dockerenv", "file"),
              ("etc/resolv.conf", "file"), ("etc/hosts", "file"), ("etc/hostname", "file"), ("dev/console", "file"),
              ("etc/mtab", "/proc/mounts"))


@dataclass(slots=True)
class Node:
    kind: str  # dir | file | symlink | chardev | blockdev | fifo
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    source: int = -1  # index of the uncompressed layer file holding the bytes
    offset: int = 0  # where the bytes start in it
    inode: int = 0  # files sharing an inode are hard links of each other
    children: dict[str, Node] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One entry of the emulated `docker export` stream."""

    name: str  # relative, directories end with '/'
    node: Node
    hardlink_to: str | None = None  # for the second and later paths of an inode


def encode(name: str) -> bytes:
    """A name as the bytes the layer held (tarfile decodes them with surrogate escapes)."""
    return name.encode("utf-8", "surrogateescape")


def sort_key(name: str) -> bytes:
    """Go sorts names as bytes; for names that are not UTF-8 that differs from code point order."""
    return encode(name)


def shown(name: str, limit: int = 120) -> str:
    """A name for a message: quoted, escaped, and cut short."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(encode(name))} bytes)"


class _LayerHeaderError(tarfile.HeaderError):
    """An extended header over our bounds (a tarfile.TarError, so reported as a broken layer)."""


def _bounded_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo for one archive that refuses huge or endlessly chained extended headers: tarfile
    reads each into memory, and reads a chain of them recursively."""
    state = {"depth": 0, "global": 0}

    class BoundedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
            if self.type not in _EXTENDED:
                return super()._proc_member(tar)  # type: ignore[misc, no-any-return]
            if self.size > MAX_EXTENDED_HEADER:
                raise _LayerHeaderError(f"an extended header of {self.size} bytes (at most {MAX_EXTENDED_HEADER})")
            if self.type == tarfile.XGLTYPE:
                state["global"] += self.size
                if state["global"] > MAX_GLOBAL_HEADERS:
                    raise _LayerHeaderError(f"global PAX headers over {MAX_GLOBAL_HEADERS} bytes")
            if state["depth"] >= MAX_HEADER_CHAIN:
                raise _LayerHeaderError(f"more than {MAX_HEADER_CHAIN} extended headers in a row")
            state["depth"] += 1
            try:
                return super()._proc_member(tar)  # type: ignore[misc, no-any-return]
            finally:
                state["depth"] -= 1

    return BoundedTarInfo


class Tree:
    """The merged root file system (metadata only) plus the layer files holding the bytes."""

    def __init__(self) -> None:
        self.root = Node("dir", 0o755, 0, 0, 0)
        self.layers: list[Path] = []
        self._next_inode = 1
        self.nodes = 0  # built so far (replaced ones included): bounded by MAX_NODES
        self.steps = 0  # path components walked so far: bounded by MAX_TOTAL_STEPS
        self.checks = LayerChecks()  # every store blob read here is verified before the EIF is kept

    def _count(self, where: str, n: int = 1) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            raise InvalidInput(f"{where}: the image has more than {MAX_NODES:,} files and directories", file="IMAGE",
                               fix="an enclave's root file system lives in its memory: make the image smaller")

    # -- building -------------------------------------------------------------------------------

    def _inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _lookup(self, parts: tuple[str, ...], where: str, *, create: bool) -> Node | None:
        """The directory node at `parts`, following symlinks inside the tree as a chroot would."""
        node = self.root
        stack: list[Node] = []
        todo = list(reversed(parts))
        links = steps = 0
        while todo:
            part = todo.pop()
            steps += 1
            if steps > MAX_LOOKUP_STEPS:
                self.steps += steps
                raise UnsafeLayer(f"{where}: resolving the path takes more than {MAX_LOOKUP_STEPS} steps",
                                  fix="the image's symbolic links are malicious or broken")
            if part in ("", "."):
                continue
            if part == "..":
                node = stack.pop() if stack else self.root
                continue
            child = node.children.get(part)
            if child is None:
                if not create:
                    break
                self._count(where)
                child = node.children[part] = Node("dir", 0o755, 0, 0, 0)
            if child.kind == "symlink":
                links += 1
                if links > MAX_SYMLINKS:
                    raise UnsafeLayer(f"{where}: too many levels of symbolic links", fix="the image is malicious or broken")
                if child.linkname.startswith("/"):
                    node, stack = self.root, []
                todo.extend(reversed(child.linkname.split("/")))
                continue
            if child.kind != "dir":
                if not create:
                    break
                self._count(where)
                child = node.children[part] = Node("dir", 0o755, 0, 0, 0)
            stack.append(node)
            node = child
        else:
            self._spend(steps, where)
            return node
        self._spend(steps, where)
        return None

    def _spend(self, steps: int, where: str) -> None:
        self.steps += steps
        if self.steps > MAX_TOTAL_STEPS:
            raise UnsafeLayer(f"{where}: resolving the image's paths takes more than {MAX_TOTAL_STEPS:,} steps",
                              fix="the image's symbolic links or directory tree are malicious")

    def _get(self, parts: tuple[str, ...], where: str) -> Node | None:
        parent = self._lookup(parts[:-1], where, create=False)
        return parent.children.get(parts[-1]) if parent is not None and parts else None

    def add_layer(self, label: str, blob: Path, workdir: Path) -> None:
        """Apply one layer blob: a plain tar is read where it lies; gzip is inflated into `workdir`.
        The blob's digest is checked before the EIF is kept (`checks`, layercheck.py); a broken layer is often a rotted
        blob, so then the check's CorruptBlob, which names the digest and the fix, wins."""
        self.checks.add(blob)
        try:
            self._add_layer(label, blob, workdir)
        except (OperationFailed, OSError):
            self.checks.wait(blob)
            raise

    def _add_layer(self, label: str, blob: Path, workdir: Path) -> None:
        index = len(self.layers)
        with open(blob, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        path = blob
        if gzipped:
            path = workdir / f"layer-{index}.tar"
            try:
                with gzip.open(blob, "rb") as gz, open(path, "wb") as out:
                    shutil.copyfileobj(gz, out, CHUNK)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise OperationFailed(f"{label}: broken layer: {e}", fix="the blob is corrupt or truncated") from None
        self.layers.append(path)
        added: dict[int, Node] = {}  # nodes this layer wrote (kept referenced, so their ids stay unique)
        opaque: dict[int, Node] = {}  # directories this layer made opaque already

        def broken(e: BaseException) -> OperationFailed:
            return OperationFailed(f"{label}: broken layer: {type(e).__name__ if not str(e) else e}",
                                   fix="the blob is corrupt or truncated")

        try:
            tar = tarfile.open(path, mode="r:", tarinfo=_bounded_tarinfo(),  # noqa: SIM115 - `with tar` below
                               encoding="utf-8", errors="surrogateescape")
        except TAR_ERRORS as e:
            raise broken(e) from None
        with tar:
            while True:
                try:
                    member = tar.next()
                except TAR_ERRORS as e:
                    raise broken(e) from None
                if member is None:
                    break
                tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every member; we need none
                self._apply(label, index, member, added, opaque)
            end = tar.offset
        with open(path, "rb") as f:  # tarfile ends quietly at a bad header; Docker's reader does not
            f.seek(end)
            rest = f.read(tarfile.BLOCKSIZE)
        if rest.strip(b"\0"):
            raise OperationFailed(f"{label}: broken layer: no valid tar header at offset {end}",
                                  fix="the blob is corrupt or truncated")

    def _check(self, where: str, m: tarfile.TarInfo) -> None:
        """What the ramdisk (newc, 32-bit numbers) and the enclave's kernel cannot hold: refused."""
        def bad(message: str, fix: str) -> InvalidInput:
            return InvalidInput(f"{where}: {message}", file="IMAGE", fix=fix)

        rename = "rename or remove it in the image"
        for what, text in (("name", m.name), ("link target", m.linkname)):
            raw = encode(text)
            if b"\0" in raw:
                raise bad(f"the {what} contains a NUL byte", "the layer is malicious or broken")
            if len(raw) >= PATH_MAX:
                raise bad(f"the {what} is {len(raw)} bytes long; Linux paths are under {PATH_MAX}", rename)
            longest = max((len(p) for p in raw.split(b"/")), default=0)
            if what == "name" and longest > NAME_MAX:
                raise bad(f"a name component is {longest} bytes long; Linux allows {NAME_MAX}", rename)
        if m.sparse is not None or m.type == tarfile.GNUTYPE_SPARSE:
            raise bad("is a sparse file, which enclaver does not read",
                      "store the file in full (docker build never writes sparse files)")
        for what, value in (("uid", m.uid), ("gid", m.gid), ("mtime", m.mtime), ("size", m.size),
                             ("device major", m.devmajor), ("device minor", m.devminor)):
            if not 0 <= value <= U32:
                if isinstance(value, float) and value.is_integer():
                    value = int(value)  # PAX numbers are read as floats
                raise bad(f"its {what} {value} does not fit the ramdisk's 32 bits",
                          "the ramdisk format (newc cpio) holds 0 … 4294967295: change the file in the image")

    def _apply(self, label: str, index: int, m: tarfile.TarInfo, added: dict[int, Node],
               opaque: dict[int, Node]) -> None:
        where = f"{label}: {shown(m.name)}"
        self._check(where, m)
        parts = tuple(p for p in m.name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise UnsafeLayer(f"{where}: climbs out of the image with '..'", fix="this layer is malicious; do not use it")
        if not parts:
            return
        name = parts[-1]
        if name == OPAQUE:
            directory = self._lookup(parts[:-1], where, create=False)
            if directory is not None and id(directory) not in opaque:  # a second marker changes nothing
                opaque[id(directory)] = directory  # referenced, so the id stays unique
                directory.children = {k: v for k, v in directory.children.items() if id(v) in added}
            return
        if name.startswith(WHITEOUT):
            parent = self._lookup(parts[:-1], where, create=False)
            if parent is not None:
                parent.children.pop(name[len(WHITEOUT):], None)
            return
        parent = self._lookup(parts[:-1], where, create=True)
        assert parent is not None
        mtime = int(m.mtime)
        if m.isdir():
            existing = parent.children.get(name)
            if existing is not None and existing.kind == "dir":
                existing.mode, existing.uid, existing.gid, existing.mtime = m.mode & 0o7777, m.uid, m.gid, mtime
                added[id(existing)] = existing
                return
            node = Node("dir", m.mode & 0o7777, m.uid, m.gid, mtime)
        elif m.isfile() or m.type == tarfile.CONTTYPE:
            node = Node("file", m.mode & 0o7777, m.uid, m.gid, mtime, m.size, source=index, offset=m.offset_data,
                        inode=self._inode())
        elif m.issym():
            # lstat reports 0777 for every symlink on Linux, whatever the layer's header said
            node = Node("symlink", 0o777, m.uid, m.gid, mtime, linkname=m.linkname)
        elif m.islnk():
            link_parts = tuple(p for p in m.linkname.split("/") if p not in ("", "."))
            target = self._get(link_parts, where) if link_parts and ".." not in link_parts else None
            if target is None or target.kind != "file":
                raise UnsafeLayer(f"{where}: hard link to {m.linkname!r}, which is not a file in the image",
                                  fix="the layer is malicious or broken; do not use the image")
            # extraction chmods/chowns/touches the link path, i.e. the inode both paths share
            target.mode, target.uid, target.gid, target.mtime = m.mode & 0o7777, m.uid, m.gid, mtime
            node = Node("file", target.mode, m.uid, m.gid, mtime, target.size, source=target.source,
                        offset=target.offset, inode=target.inode)
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = "chardev" if m.ischr() else "blockdev" if m.isblk() else "fifo"
            node = Node(kind, m.mode & 0o7777, m.uid, m.gid, mtime, devmajor=m.devmajor, devminor=m.devminor)
        else:
            return
        self._count(where)
        parent.children[name] = node
        added[id(node)] = node

    def add_init_layer(self) -> None:
        """What Docker's init layer does to every container's tree, as moby's `initlayer.Setup` does it.

        For each path it unlinks every component (unlink(2) removes files, symlinks and devices and
        fails on directories, so only directories survive), then creates what is missing: parents
        as 0755 root directories, the path itself as a 0755 root directory, empty 0755 root file or
        symlink. So a directory the image has keeps the image's mode, owner and contents (the
        export shows them), while an image's `etc/hosts` or a symlinked `etc` never survive. The
        order of the paths does not matter (moby walks a Go map): each path's result depends only
        on the directories on its way, which no other path removes.
        """
        for path, kind in INIT_LAYER:
            node = self.root
            *parents, last = path.split("/")
            for part in parents:
                child = node.children.get(part)
                if child is None or child.kind != "dir":
                    child = node.children[part] = Node("dir", 0o755, 0, 0, 0)
                node = child
            existing = node.children.get(last)
            if existing is not None and existing.kind == "dir":
                continue  # unlink fails on a directory, and stat finds it: left as the image has it
            if kind == "dir":
                node.children[last] = Node("dir", 0o755, 0, 0, 0)
            elif kind == "file":
                node.children[last] = Node("file", 0o755, 0, 0, 0, 0, inode=self._inode())
            else:
                node.children[last] = Node("symlink", 0o777, 0, 0, 0, linkname=kind)

    # -- reading --------------------------------------------------------------------------------

    def export(self) -> Iterator[ExportEntry]:
        """Entries in `docker export` order: WalkDir (names sorted as bytes, depth first), root
        skipped. Walked with an explicit stack: depth costs memory per level, never recursion."""
        seen: dict[int, str] = {}
        stack: list[tuple[Iterator[str], Node, str]] = [(iter(sorted(self.root.children, key=sort_key)), self.root, "")]
        while stack:
            names, node, prefix = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child = node.children[name]
            path = prefix + name
            if child.kind == "dir":
                yield ExportEntry(path + "/", child)
                stack.append((iter(sorted(child.children, key=sort_key)), child, path + "/"))
            elif child.kind == "file" and child.inode in seen:
                yield ExportEntry(path, child, hardlink_to=seen[child.inode])
            else:
                if child.kind == "file":
                    seen[child.inode] = path
                yield ExportEntry(path, child)

    def read(self, node: Node) -> Iterator[bytes]:
        if node.size == 0:
            return
        layer = self.checks.reader(self.layers[node.source])
        if layer is not None:  # a plain store blob: its digest is hashed from these reads
            yield from layer.read(node.offset, node.size)
            return
        with open(self.layers[node.source], "rb") as f:
            f.seek(node.offset)
            left = node.size
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise OperationFailed("a layer file ended early", fix="a bug or a full disk: report it")
                left -= len(chunk)
                yield chunk


def build_tree(layers: Iterable[tuple[str, Path]], workdir: str | os.PathLike[str]) -> Tree:
    """The merged tree of layer blobs (paths, e.g. in the store), bottom layer first."""
    tree = Tree()
    for label, blob in layers:
        tree.add_layer(label, blob, Path(workdir))
    tree.add_init_layer()
    return tree
