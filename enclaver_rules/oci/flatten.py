"""Apply an image's layers to a directory, safely: a malicious layer can never write outside it.

* Member names are normalised (leading `/` and `./` dropped); a `..` component refuses the layer.
* Every parent path is resolved inside the root, reading symlinks as if the root were `/`
  (absolute targets restart at the root, `..` stops at it), so no symlink, planted by an earlier
  layer or earlier in the same layer, can carry a write outside.
* Files are created with O_NOFOLLOW|O_EXCL after removing whatever was there; hard-link targets
  are resolved the same confined way and must be regular files.
* Whiteouts: `.wh.NAME` deletes NAME from lower layers; `.wh..wh..opq` empties a directory of
  what lower layers put there.
* Device nodes and FIFOs are never created on the host: they are returned as `SpecialFile`s for
  the ramdisk writer to record.
* Streaming: each layer is read once, decompressed on the fly; no layer is held in memory.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from enclaver_rules.errors import OperationFailed

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINKS = 40
CHUNK = 1 << 20


class UnsafeLayer(OperationFailed):
    """A layer tried to write outside the root, or is otherwise not safe to apply."""


@dataclass(frozen=True, slots=True)
class SpecialFile:
    path: str
    kind: str  # chardev | blockdev | fifo
    mode: int
    major: int = 0
    minor: int = 0
    uid: int = 0
    gid: int = 0


@dataclass(slots=True)
class Flattened:
    root: Path
    special: dict[str, SpecialFile] = field(default_factory=dict)
    entries: int = 0


def _parts(name: str, where: str) -> tuple[str, ...]:
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeLayer(f"{where}: entry {name!r} climbs out of the image with '..'",
                          fix="this layer is malicious or broken; do not use the image")
    return parts


def resolve_inside(root: str, parts: tuple[str, ...], where: str) -> str:
    """The real path of `parts` under `root`, following symlinks as a chroot would."""
    done: list[str] = []
    todo = list(reversed(parts))
    links = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            done.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise UnsafeLayer(f"{where}: too many levels of symbolic links", fix="the image is malicious or broken")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            todo.extend(reversed(target.split("/")))
        else:
            done.append(part)
    return os.path.join(root, *done)


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def open_layer(stream: BinaryIO) -> BinaryIO:
    """The uncompressed tar stream of a layer blob (gzip or plain tar, detected by magic).

    gzip.GzipFile reads its source sequentially in bounded chunks, so this streams.
    """
    buffered = io.BufferedReader(stream, CHUNK)  # type: ignore[type-var]
    magic = buffered.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        raise OperationFailed("zstd-compressed layers are not supported yet",
                              fix="rebuild the image with gzip layers (the default of docker and buildx)")
    return buffered


def flatten(layers: Iterable[tuple[str, BinaryIO]], root: str | os.PathLike[str], *,
            preserve_owner: bool | None = None) -> Flattened:
    """Apply (label, blob stream) layers in order to the directory `root` (created if missing)."""
    target = Path(root)
    target.mkdir(parents=True, exist_ok=True)
    real_root = os.path.realpath(target)
    owner = os.geteuid() == 0 if preserve_owner is None else preserve_owner
    result = Flattened(target)
    dir_times: dict[str, int] = {}
    for label, stream in layers:
        _apply(label, open_layer(stream), real_root, owner, result, dir_times)
    for path in sorted(dir_times, key=len, reverse=True):  # children first: their creation touched parents
        if os.path.isdir(path) and not os.path.islink(path):
            os.utime(path, (dir_times[path], dir_times[path]))
    return result


def _inside(real_root: str, path: str) -> bool:
    return path == real_root or path.startswith(real_root + os.sep)


def _apply(label: str, stream: BinaryIO, root: str, owner: bool, result: Flattened,
           dir_times: dict[str, int]) -> None:
    added: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                _member(label, tar, member, root, owner, result, dir_times, added)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise OperationFailed(f"{label}: broken layer: {e}", fix="the blob is corrupt or truncated") from None


def _member(label: str, tar: tarfile.TarFile, m: tarfile.TarInfo, root: str, owner: bool, result: Flattened,
            dir_times: dict[str, int], added: set[str]) -> None:
    where = f"{label}: {m.name!r}"
    parts = _parts(m.name, label)
    if not parts:
        return  # the root itself ("./")
    parent = resolve_inside(root, parts[:-1], where)
    name = parts[-1]
    if not _inside(root, parent):
        raise UnsafeLayer(f"{where} resolves outside the image root", fix="the layer is malicious; do not use it")
    rel = "/".join(parts)
    if name == OPAQUE:
        if os.path.isdir(parent) and not os.path.islink(parent):
            for child in os.listdir(parent):
                path = os.path.join(parent, child)
                if path not in added:
                    _remove(path)
        return
    if name.startswith(WHITEOUT):
        hidden = name[len(WHITEOUT):]
        if hidden in ("", ".", ".."):
            raise UnsafeLayer(f"{where}: a whiteout without a name", fix="the layer is malicious or broken")
        _remove(os.path.join(parent, hidden))
        result.special.pop("/".join((*parts[:-1], hidden)), None)
        return
    os.makedirs(parent, exist_ok=True)
    final = os.path.join(parent, name)
    existing = os.path.lexists(final)
    if m.isdir():
        if existing and not (os.path.isdir(final) and not os.path.islink(final)):
            _remove(final)
        os.makedirs(final, exist_ok=True)
        os.chmod(final, m.mode & 0o7777)
        dir_times[final] = int(m.mtime)
    elif m.isfile() or m.type == tarfile.CONTTYPE:
        _remove(final)
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            source = tar.extractfile(m)
            assert source is not None
            for chunk in iter(lambda: source.read(CHUNK), b""):
                out.write(chunk)
        os.chmod(final, m.mode & 0o7777)
    elif m.issym():
        _remove(final)
        os.symlink(m.linkname, final)
    elif m.islnk():
        link_parts = _parts(m.linkname, label)
        source_parent = resolve_inside(root, link_parts[:-1], where)
        source_path = os.path.join(source_parent, link_parts[-1]) if link_parts else root
        if not _inside(root, source_path) or not os.path.lexists(source_path) or os.path.isdir(source_path):
            raise UnsafeLayer(f"{where}: hard link to {m.linkname!r}, which is not a file inside the image",
                              fix="the layer is malicious or broken; do not use the image")
        if os.path.abspath(source_path) != os.path.abspath(final):
            _remove(final)
            os.link(source_path, final, follow_symlinks=False)
    elif m.ischr() or m.isblk() or m.isfifo():
        _remove(final)
        kind = "chardev" if m.ischr() else "blockdev" if m.isblk() else "fifo"
        result.special[rel] = SpecialFile(rel, kind, m.mode & 0o7777, m.devmajor, m.devminor, m.uid, m.gid)
        return
    else:
        return  # other types (e.g. GNU volume headers) carry no file
    added.add(final)
    result.entries += 1
    if owner:
        with contextlib.suppress(OSError):
            os.lchown(final, m.uid, m.gid)
    if not m.isdir():
        os.utime(final, (int(m.mtime), int(m.mtime)), follow_symlinks=False)
