"""Apply an image's layers to a directory, safely: a malicious layer can never reach outside it.

* Member names are normalised (leading `/` and `./` dropped); a `..` component refuses the layer.
* Every path is walked one component at a time from a descriptor of the root (`openat` with
  `O_NOFOLLOW | O_DIRECTORY`), and every change is made relative to the descriptor of its parent
  directory (`dir_fd`, `follow_symlinks=False`, `O_NOFOLLOW | O_EXCL`): no system call is ever given
  a path through which the kernel could follow a link. Symlinks inside the image are read and
  resolved by this module as if the root were `/` (absolute targets restart at the root, `..` stops
  at it), so no symlink, planted by an earlier layer or earlier in the same layer, carries a write,
  a mode, an owner or a time outside. (The walk is by hand because Python offers no
  `openat2(RESOLVE_IN_ROOT)`, and `os.makedirs`/`os.fwalk` recurse and follow paths.) Hard links must name a regular file or a symlink inside the
  image, found the same way, and are made with `linkat` without following.
* Directory modes and times are applied at the end (deepest first), each directory reopened by the
  same no-follow walk and checked to be the very directory the layer made (device and inode): a
  directory replaced by a symlink in a later layer is skipped, never followed. Until then every
  directory is 0700, so the flattening user can always write into it, and others cannot look in.
* Set-id bits (setuid, setgid) are dropped from every entry: a flattened tree lies on the builder's
  disk, where a set-id file from a hostile image is a privilege escalation for anyone who can reach
  it. They are kept only with `keep_setid=True` when running as root and preserving owners (the
  files then belong to the image's users, as in a container), and only if the owner was set.
* Limits, each a clear `UnsafeLayer` naming the layer, the entry and the fix (exit 2 in the CLI),
  never a traceback: names and link targets of at most 4,095 bytes with no NUL, components of at
  most 255 bytes (NAME_MAX), at most 256 directories deep (also after following symlinks), 40
  symlinks and 4,096 components per lookup, and 1 MiB of pax or GNU long-name header per entry
  (the memory one entry can make tarfile hold). The parent of an entry must be a directory.
* Whiteouts: `.wh.NAME` deletes NAME from lower layers; `.wh..wh..opq` empties a directory of
  what lower layers put there.
* Device nodes and FIFOs are never created on the host: they are returned as `SpecialFile`s (keyed
  by where they land) for the ramdisk writer to record.
* Streaming: each layer is read once, decompressed on the fly; no layer is held in memory.
* A failed flatten removes the root it created (callers stage into a fresh `NAME.tmp-<pid>`), and
  leaves a root that existed before as it is.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from enclaver_rules.errors import InvalidInput, OperationFailed

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINKS = 40
CHUNK = 1 << 20
#: Linux's limits: a path (without its NUL) and one component, in bytes.
PATH_MAX = 4095
NAME_MAX = 255
#: Directories an entry may lie below (also after following symlinks). Real images stay far below it;
#: it keeps every walk, removal and final pass bounded in time, descriptors and recursion.
MAX_DEPTH = 256
#: Payload of a pax extended header or GNU long name/link entry, which tarfile reads whole into memory.
MAX_HEADER = 1 << 20
#: Components one lookup may step through, symlinks followed included (Linux allows 40 links of 4 KiB).
MAX_STEPS = 4096
SETID = stat.S_ISUID | stat.S_ISGID
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MALICIOUS = "the layer is malicious or broken; do not use the image"


class UnsafeLayer(InvalidInput, OperationFailed):
    """A layer tried to reach outside the root, or is otherwise not safe to apply.

    Invalid input (exit 2: the image is wrong, nothing about the machine), and still an
    `OperationFailed` for the callers that catch that."""


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


def show(name: str, limit: int = 120) -> str:
    """A member name for a message: quoted, and cut short when a hostile one is kilobytes long."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit]}…' ({len(os.fsencode(name)) if _encodable(name) else '?'} bytes)"


def _encodable(name: str) -> bool:
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


def _size(text: str, label: str, what: str) -> int:
    """Bytes of a name as the kernel would see them; NUL and unencodable names refuse the layer."""
    if "\0" in text or not _encodable(text):
        raise UnsafeLayer(f"{what} {show(text)} contains a NUL byte or undecodable characters", file=label,
                          fix=_MALICIOUS)
    return len(os.fsencode(text))


def member_parts(name: str, label: str) -> tuple[str, ...]:
    """The normalised components of a member name; names that climb or break a limit refuse the layer."""
    if _size(name, label, "entry") > PATH_MAX:
        raise UnsafeLayer(f"entry {show(name)} has a name longer than {PATH_MAX} bytes", file=label,
                          fix="shorten the path in the image (Linux refuses such paths)")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeLayer(f"entry {show(name)} climbs out of the image with '..'", file=label,
                          fix="this layer is malicious or broken; do not use the image")
    for part in parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UnsafeLayer(f"entry {show(name)} has a component of {len(os.fsencode(part))} bytes, more than "
                              f"{NAME_MAX}", file=label,
                              fix=f"rename it in the image: Linux file names are at most {NAME_MAX} bytes")
    if len(parts) > MAX_DEPTH:
        raise UnsafeLayer(f"entry {show(name)} is {len(parts)} directories deep, more than {MAX_DEPTH}", file=label,
                          fix=f"flatten the directory tree in the image to at most {MAX_DEPTH} levels")
    return parts


def link_target(target: str, label: str, name: str) -> str:
    if not target:
        raise UnsafeLayer(f"entry {show(name)} is a link to nothing (an empty target)", file=label, fix=_MALICIOUS)
    if _size(target, label, f"the target of {show(name)}") > PATH_MAX:
        raise UnsafeLayer(f"entry {show(name)} links to a target longer than {PATH_MAX} bytes", file=label,
                          fix=_MALICIOUS)
    return target


class _HugeHeader(tarfile.HeaderError):
    pass


class _TarInfo(tarfile.TarInfo):
    """tarfile's TarInfo, refusing header entries whose payload it would read whole into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > MAX_HEADER:
            raise _HugeHeader(f"an extended header (pax or GNU long name) of {self.size:,} bytes, more than "
                              f"{MAX_HEADER:,}")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


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


def read_layer(label: str, stream: BinaryIO, visit: Callable[[tarfile.TarFile, tarfile.TarInfo], None]) -> None:
    """Call `visit(tar, member)` for each member of a layer blob, in order, streaming; a corrupt,
    truncated or oversized-header layer is a clear error naming it."""
    try:
        with tarfile.open(fileobj=open_layer(stream), mode="r|", tarinfo=_TarInfo) as tar:
            for member in tar:
                visit(tar, member)
    except _HugeHeader as e:
        raise UnsafeLayer(f"{e}", file=label, fix=_MALICIOUS) from None
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise OperationFailed(f"{label}: broken layer: {e}", file=label,
                              fix="the blob is corrupt or truncated, or not a layer") from None


def flatten(layers: Iterable[tuple[str, BinaryIO]], root: str | os.PathLike[str], *,
            preserve_owner: bool | None = None, keep_setid: bool = False) -> Flattened:
    """Apply (label, blob stream) layers in order to the directory `root` (created if missing).

    `preserve_owner` (default: when running as root) gives entries the image's owners.
    `keep_setid` keeps setuid/setgid bits, but only as root with owners preserved (see the module)."""
    target = Path(root)
    created = not os.path.lexists(target)
    target.mkdir(parents=True, exist_ok=True)
    owner = os.geteuid() == 0 if preserve_owner is None else preserve_owner
    # the caller's own path may pass through symlinks (its choice); nothing below it is followed
    root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        work = _Flattener(root_fd, Flattened(target), owner, keep_setid and owner and os.geteuid() == 0)
        for label, stream in layers:
            work.layer(label, stream)
        try:
            work.finish()
        except OSError as e:
            raise OperationFailed(f"{target}: cannot set the modes and times of its directories: {e}",
                                  file=str(target), fix="check the permissions of the directory") from None
        return work.result
    except BaseException:
        if created:
            _force_rmtree(target)
        raise
    finally:
        os.close(root_fd)


def _force_rmtree(path: Path) -> None:
    """Remove a tree this module made, also when a directory's final mode forbids it (as non-root)."""

    def retry(function: Callable[..., Any], failed: str, _info: Any) -> None:
        if function not in (os.unlink, os.rmdir):
            return
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)  # a directory rmtree reached without following links
            function(failed)

    shutil.rmtree(path, onerror=retry)  # onerror: Python 3.11 (onexc is 3.12+)


@dataclass(slots=True)
class _Dir:
    dev: int
    ino: int
    mode: int
    mtime: int | None


class _Flattener:
    def __init__(self, root_fd: int, result: Flattened, owner: bool, keep_setid: bool) -> None:
        self.root_fd = root_fd
        self.result = result
        self.owner = owner
        self.keep_setid = keep_setid
        self.dirs: dict[tuple[str, ...], _Dir] = {}

    # -- walking -------------------------------------------------------------------------------

    def _open_root(self) -> int:
        return os.open(".", _DIR_FLAGS, dir_fd=self.root_fd)

    def walk(self, parts: tuple[str, ...], label: str, name: str, *,
             create: bool) -> tuple[int, tuple[str, ...]] | None:
        """A descriptor of the directory `parts` names (and its real components), following the
        image's symlinks as a chroot would; missing directories are made when `create`, else None."""
        fd = self._open_root()
        done: list[str] = []
        todo = list(reversed(parts))
        links = steps = 0
        try:
            while todo:
                part = todo.pop()
                steps += 1
                if steps > MAX_STEPS:
                    raise UnsafeLayer(f"entry {show(name)}: more than {MAX_STEPS} path components to follow through "
                                      f"symbolic links", file=label, fix=_MALICIOUS)
                if part in ("", "."):
                    continue
                if part == "..":
                    if done:  # `..` of a directory reached without following anything: still inside
                        up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                        os.close(fd)
                        fd = up
                        done.pop()
                    continue
                if len(os.fsencode(part)) > NAME_MAX:
                    raise UnsafeLayer(f"entry {show(name)}: a symbolic link on its way names a component longer "
                                      f"than {NAME_MAX} bytes", file=label, fix=_MALICIOUS)
                try:
                    st = os.lstat(part, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    self._depth(len(done) + 1, label, name)
                    os.mkdir(part, 0o700, dir_fd=fd)
                    self.result.special.pop("/".join((*done, part)), None)  # a device recorded there is gone
                    st = os.lstat(part, dir_fd=fd)
                    self.dirs[(*done, part)] = _Dir(st.st_dev, st.st_ino, 0o755, None)  # as Docker makes them
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise UnsafeLayer(f"entry {show(name)}: too many levels of symbolic links", file=label,
                                          fix=_MALICIOUS)
                    link = os.readlink(part, dir_fd=fd)
                    if link.startswith("/"):
                        os.close(fd)
                        fd = self._open_root()
                        done = []
                    todo.extend(reversed(link.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise UnsafeLayer(f"entry {show(name)}: {'/'.join((*done, part))!r} is not a directory",
                                      file=label, fix="the layers disagree on what this path is; rebuild the image")
                self._depth(len(done) + 1, label, name)
                below = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = below
                done.append(part)
        except BaseException:
            os.close(fd)
            raise
        return fd, tuple(done)

    @staticmethod
    def _depth(depth: int, label: str, name: str) -> None:
        if depth >= MAX_DEPTH:  # the directory holding an entry: the entry itself is one deeper
            raise UnsafeLayer(f"entry {show(name)} lands more than {MAX_DEPTH} directories deep (following the "
                              f"image's symbolic links)", file=label,
                              fix=f"flatten the directory tree in the image to at most {MAX_DEPTH} levels")

    def _reopen(self, parts: tuple[str, ...]) -> int | None:
        """The directory at exactly `parts`, following nothing at all; None if any step is not a directory."""
        fd = self._open_root()
        for part in parts:
            try:
                below = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError:  # ELOOP (a symlink), ENOENT, ENOTDIR: not the directory we made
                os.close(fd)
                return None
            os.close(fd)
            fd = below
        return fd

    # -- changes -------------------------------------------------------------------------------

    def _forget(self, rel: tuple[str, ...]) -> None:
        key = "/".join(rel)
        for path in [p for p in self.result.special if p == key or p.startswith(key + "/")]:
            del self.result.special[path]

    def remove(self, fd: int, parent: tuple[str, ...], name: str) -> None:
        self._forget((*parent, name))
        try:
            st = os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=fd)  # descriptor-based: never follows a symlink inside
        else:
            os.unlink(name, dir_fd=fd)

    def _mode(self, m: tarfile.TarInfo, owned: bool) -> int:
        mode = m.mode & 0o7777
        return mode if self.keep_setid and owned else mode & ~SETID

    def _chown(self, fd: int, m: tarfile.TarInfo) -> bool:
        if not self.owner:
            return False
        try:
            os.fchown(fd, m.uid, m.gid)
        except OSError:
            return False
        return True

    def layer(self, label: str, stream: BinaryIO) -> None:
        added: set[tuple[str, ...]] = set()

        def visit(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
            try:
                self.member(label, tar, member, added)
            except OSError as e:
                raise OperationFailed(f"entry {show(member.name)}: {e.strerror or e}", file=label,
                                      fix="check the free space and permissions of the directory flattened into"
                                      ) from None

        read_layer(label, stream, visit)

    def member(self, label: str, tar: tarfile.TarFile, m: tarfile.TarInfo, added: set[tuple[str, ...]]) -> None:
        parts = member_parts(m.name, label)
        if not parts:
            return  # the root itself ("./")
        name = parts[-1]
        if name == OPAQUE or name.startswith(WHITEOUT):
            hidden = None if name == OPAQUE else name[len(WHITEOUT):]
            if hidden in ("", ".", ".."):
                raise UnsafeLayer(f"entry {show(m.name)}: a whiteout without a name", file=label, fix=_MALICIOUS)
            found = self.walk(parts[:-1], label, m.name, create=False)
            if found is None:
                return  # nothing there to hide
            fd, real = found
            try:
                if hidden is not None:
                    self.remove(fd, real, hidden)
                else:
                    for child in os.listdir(fd):
                        if (*real, child) not in added:
                            self.remove(fd, real, child)
                    key = "/".join(real)
                    for path in [p for p in self.result.special if p.startswith(key + "/" if key else "")]:
                        if tuple(path.split("/")) not in added:
                            del self.result.special[path]
            finally:
                os.close(fd)
            return
        found = self.walk(parts[:-1], label, m.name, create=True)
        assert found is not None
        fd, real = found
        try:
            if self.create(label, tar, m, fd, real, name):
                added.add((*real, name))
                self.result.entries += 1
        finally:
            os.close(fd)

    def create(self, label: str, tar: tarfile.TarFile, m: tarfile.TarInfo, fd: int, real: tuple[str, ...],
               name: str) -> bool:
        rel = (*real, name)
        mtime = int(m.mtime)
        if m.isdir():
            self.result.special.pop("/".join(rel), None)  # a device there is replaced; those below stay
            try:
                st: os.stat_result | None = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                self.remove(fd, real, name)
                st = None
            if st is None:
                os.mkdir(name, 0o700, dir_fd=fd)
            dfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            try:
                owned = self._chown(dfd, m)
                here = os.fstat(dfd)
                self.dirs[rel] = _Dir(here.st_dev, here.st_ino, self._mode(m, owned), mtime)
                os.fchmod(dfd, 0o700)  # until finish(): writable by us, closed to others
            finally:
                os.close(dfd)
        elif m.isreg():
            self.remove(fd, real, name)
            out_fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=fd)
            with os.fdopen(out_fd, "wb") as out:
                source = tar.extractfile(m)
                assert source is not None
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    out.write(chunk)
                out.flush()
                owned = self._chown(out_fd, m)  # before the mode: chown clears set-id bits
                os.fchmod(out_fd, self._mode(m, owned))
                os.utime(out_fd, (mtime, mtime))
        elif m.issym():
            target = link_target(m.linkname, label, m.name)
            self.remove(fd, real, name)
            os.symlink(target, name, dir_fd=fd)
            if self.owner:
                with contextlib.suppress(OSError):
                    os.chown(name, m.uid, m.gid, dir_fd=fd, follow_symlinks=False)
            os.utime(name, (mtime, mtime), dir_fd=fd, follow_symlinks=False)
        elif m.islnk():
            self._hardlink(label, m, fd, real, name)
        elif m.ischr() or m.isblk() or m.isfifo():
            self.remove(fd, real, name)
            kind = "chardev" if m.ischr() else "blockdev" if m.isblk() else "fifo"
            key = "/".join(rel)
            self.result.special[key] = SpecialFile(key, kind, self._mode(m, self.owner), m.devmajor, m.devminor,
                                                   m.uid, m.gid)
        else:
            return False  # other types (e.g. GNU volume headers) carry no file
        return True

    def _hardlink(self, label: str, m: tarfile.TarInfo, fd: int, real: tuple[str, ...], name: str) -> None:
        link_target(m.linkname, label, m.name)
        source = member_parts(m.linkname, label)
        refuse = UnsafeLayer(f"entry {show(m.name)}: hard link to {show(m.linkname)}, which is not a file inside "
                             f"the image", file=label, fix=_MALICIOUS)
        if not source:
            raise refuse
        found = self.walk(source[:-1], label, m.name, create=False)
        if found is None:
            raise refuse
        source_fd, _ = found
        try:
            try:
                st = os.lstat(source[-1], dir_fd=source_fd)
            except FileNotFoundError:
                raise refuse from None
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise refuse
            try:
                existing = os.lstat(name, dir_fd=fd)
                if (existing.st_dev, existing.st_ino) == (st.st_dev, st.st_ino):
                    return  # already that file (a link to itself)
            except FileNotFoundError:
                pass
            self.remove(fd, real, name)
            # linkat without AT_SYMLINK_FOLLOW: a link to a symlink is another name for the symlink
            os.link(source[-1], name, src_dir_fd=source_fd, dst_dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(source_fd)

    def finish(self) -> None:
        """Directory modes and times, deepest first, on exactly the directories the layers made."""
        for rel, record in sorted(self.dirs.items(), key=lambda item: len(item[0]), reverse=True):
            fd = self._reopen(rel)
            if fd is None:
                continue
            try:
                here = os.fstat(fd)
                if (here.st_dev, here.st_ino) != (record.dev, record.ino):
                    continue  # removed and made again since: not the directory this record is about
                os.fchmod(fd, record.mode)
                if record.mtime is not None:
                    os.utime(fd, (record.mtime, record.mtime))
            finally:
                os.close(fd)
