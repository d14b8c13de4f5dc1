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

from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci.flatten import OPAQUE, WHITEOUT, UnsafeLayer

CHUNK = 4 << 20  # big reads: fewer hand-offs to the hashing threads
MAX_SYMLINKS = 40
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


class Tree:
    """The merged root file system (metadata only) plus the layer files holding the bytes."""

    def __init__(self) -> None:
        self.root = Node("dir", 0o755, 0, 0, 0)
        self.layers: list[Path] = []
        self._next_inode = 1

    # -- building -------------------------------------------------------------------------------

    def _inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _lookup(self, parts: tuple[str, ...], where: str, *, create: bool) -> Node | None:
        """The directory node at `parts`, following symlinks inside the tree as a chroot would."""
        node = self.root
        stack: list[Node] = []
        todo = list(reversed(parts))
        links = 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                node = stack.pop() if stack else self.root
                continue
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
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
                    return None
                child = node.children[part] = Node("dir", 0o755, 0, 0, 0)
            stack.append(node)
            node = child
        return node

    def _get(self, parts: tuple[str, ...], where: str) -> Node | None:
        parent = self._lookup(parts[:-1], where, create=False)
        return parent.children.get(parts[-1]) if parent is not None and parts else None

    def add_layer(self, label: str, blob: Path, workdir: Path) -> None:
        """Apply one layer blob: a plain tar is read where it lies; gzip is inflated into `workdir`."""
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
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    self._apply(label, index, member, added)
        except tarfile.TarError as e:
            raise OperationFailed(f"{label}: broken layer: {e}", fix="the blob is corrupt or truncated") from None

    def _apply(self, label: str, index: int, m: tarfile.TarInfo, added: dict[int, Node]) -> None:
        where = f"{label}: {m.name!r}"
        parts = tuple(p for p in m.name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise UnsafeLayer(f"{where}: climbs out of the image with '..'", fix="this layer is malicious; do not use it")
        if not parts:
            return
        name = parts[-1]
        if name == OPAQUE:
            directory = self._lookup(parts[:-1], where, create=False)
            if directory is not None:
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
        """Entries in `docker export` order: WalkDir (sorted names, depth first), root skipped."""
        seen: dict[int, str] = {}

        def walk(node: Node, prefix: str) -> Iterator[ExportEntry]:
            for name in sorted(node.children):
                child = node.children[name]
                path = prefix + name
                if child.kind == "dir":
                    yield ExportEntry(path + "/", child)
                    yield from walk(child, path + "/")
                elif child.kind == "file" and child.inode in seen:
                    yield ExportEntry(path, child, hardlink_to=seen[child.inode])
                else:
                    if child.kind == "file":
                        seen[child.inode] = path
                    yield ExportEntry(path, child)

        yield from walk(self.root, "")

    def read(self, node: Node) -> Iterator[bytes]:
        if node.size == 0:
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
