"""The host side of files out: read odyn's vsock 17003 and mirror the enclave's `outputs:` under a directory.

A file the enclave calls `var/log/app/x.log` becomes `<directory>/var/log/app/x.log`. The enclave
is not trusted to name things well:

* Names. The decoder (`enclaver_rules.link.files`) refuses absolute names, `..`, `.`, empty
  components, NUL and backslash before a name reaches this module; then every component is
  opened relative to its parent's descriptor with O_NOFOLLOW, so a symlink in the host directory
  (planted by anyone) is never followed, and the leaf must be a regular file. Nothing is written
  outside `directory`. With `prefixes`, names outside them are ignored too.
* Writes. Files are opened append-only (O_APPEND); a file the enclave replaced or truncated
  (a FILE frame with another identity, or shorter than our copy) is truncated and written again
  from its start. Data we already hold (after a reconnect) is skipped, not rewritten.
* Size. `Limits`: bytes per file, bytes in all, number of files. Past a limit, data is dropped and
  one line says so; the stream keeps going.
* A stream that breaks the protocol ends files out for this run (one line says why); a broken
  connection is retried, and a clean end-of-stream (odyn's, after the app exited and a last scan)
  ends `serve()`.

Nothing is ever sent to the enclave on this connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from enclaver_rules.link.files import DATA, FILE, FilesDecoder, FilesFrameError, Frame
from enclaver_rules.link.transport import Transport
from enclaver_rules.ports import FILES_OUT_PORT

log = logging.getLogger("enclaver.files_out")


@dataclass(frozen=True)
class Limits:
    file_bytes: int = 256 << 20
    total_bytes: int = 4 << 30
    files: int = 4096


@dataclass
class _Copy:
    identity: bytes
    size: int = 0
    refused: bool = False  # unwritable here (a symlink or directory in the way, a limit): drop its data


@dataclass
class Mirror:
    """Applies frames to `directory`; no I/O but the directory's own. `note` gets one line per problem."""

    directory: str
    limits: Limits = field(default_factory=Limits)
    prefixes: tuple[str, ...] = ()  # wire names must start with one of these (e.g. "var/log/app"), if given
    note: Callable[[str], object] = log.warning
    files: dict[str, _Copy] = field(default_factory=dict)
    total: int = 0
    _told: set[str] = field(default_factory=set)

    def _say(self, key: str, line: str) -> None:
        if key not in self._told:
            self._told.add(key)
            self.note(line)

    def apply(self, frame: Frame) -> None:
        if frame.kind == FILE:
            self._file(frame.name, frame.payload, frame.offset)
        elif frame.kind == DATA:
            self._data(frame.name, frame.offset, frame.payload)

    def _allowed(self, name: str) -> bool:
        return not self.prefixes or any(name == p or name.startswith(p + "/") for p in self.prefixes)

    def _file(self, name: str, identity: bytes, length: int) -> None:
        copy = self.files.get(name)
        if copy is not None and copy.identity == identity and copy.size <= length and not copy.refused:
            return  # the same file, and we hold a prefix of it: carry on appending
        if copy is None and len(self.files) >= self.limits.files:
            self._say("files", f"files out: more than {self.limits.files} files; {name!r} and later ones are not copied")
            return
        if not self._allowed(name):
            self._say(f"prefix:{name}", f"files out: {name!r} is outside the outputs; ignored")
            self.files[name] = _Copy(identity, refused=True)
            return
        if copy is not None:
            self.total -= copy.size
        self.files[name] = new = _Copy(identity)
        try:
            os.close(self._open(name, truncate=True))
        except OSError as e:
            new.refused = True
            self._say(f"open:{name}", f"files out: cannot write {name!r} under {self.directory}: {e}")

    def _data(self, name: str, offset: int, data: bytes) -> None:
        copy = self.files.get(name)
        if copy is None:
            return  # not copied (past the files limit); `receive` checks that a FILE frame came first
        if copy.refused or offset + len(data) <= copy.size:
            return  # dropped, or already held (a reconnect sends files from their start)
        if offset > copy.size:
            copy.refused = True  # a gap: we dropped something earlier; never write a file with a hole
            self._say(f"gap:{name}", f"files out: {name!r} has a gap at {copy.size}; no longer copied")
            return
        data = data[copy.size - offset:]
        room = min(self.limits.file_bytes - copy.size, self.limits.total_bytes - self.total)
        if len(data) > room:
            data = data[:max(room, 0)]
            copy.refused = True
            self._say(f"cap:{name}", f"files out: {name!r} reached a size limit ({self.limits}); the rest is dropped")
        if not data:
            return
        try:
            fd = self._open(name, truncate=False)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as e:
            copy.refused = True
            self._say(f"write:{name}", f"files out: cannot write {name!r} under {self.directory}: {e}")
            return
        copy.size += len(data)
        self.total += len(data)

    def _open(self, name: str, *, truncate: bool) -> int:
        """An append-only descriptor for `directory/name`, creating directories on the way; never
        through a symlink, only a regular file."""
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts):  # the decoder refused these already
            raise OSError(f"unsafe name {name!r}")
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o750, dir_fd=fd)
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = sub
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            leaf = os.open(parts[-1], flags | (os.O_TRUNC if truncate else 0), 0o640, dir_fd=fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(leaf).st_mode):
            os.close(leaf)
            raise OSError(f"{name!r} is not a regular file here")
        return leaf


async def receive(reader: asyncio.StreamReader, mirror: Mirror, chunk: int = 1 << 16) -> None:
    """Apply one connection's frames until end-of-stream. FilesFrameError for a stream that breaks
    the protocol (including one cut inside a frame); a broken connection raises its OSError."""
    decoder = FilesDecoder()
    announced: set[str] = set()
    while data := await reader.read(chunk):
        decoder.push(data)
        while (frame := decoder.next()) is not None:  # frames before a bad one are applied
            if frame.kind == FILE:
                announced.add(frame.name)
            elif frame.name not in announced:
                raise FilesFrameError(f"data for {frame.name!r} before its FILE frame on this connection")
            mirror.apply(frame)
    if not decoder.at_boundary():
        raise FilesFrameError("the stream ended inside a frame")


@dataclass
class FilesOut:
    """What the runner starts: `await FilesOut(transport, enclave_cid, directory).serve()`.

    Connects to odyn's files-out port (retrying every `retry` seconds while nobody listens, and
    after a broken connection), mirrors under `directory` (created if missing), and returns at
    odyn's clean end-of-stream. Cancel the task to stop earlier. A protocol violation is logged
    and ends `serve()` too (False)."""

    transport: Transport
    cid: int
    directory: str
    port: int = FILES_OUT_PORT
    limits: Limits = field(default_factory=Limits)
    prefixes: tuple[str, ...] = ()
    retry: float = 0.25
    note: Callable[[str], object] = log.warning
    mirror: Mirror = field(init=False)

    def __post_init__(self) -> None:
        self.mirror = Mirror(self.directory, self.limits, self.prefixes, self.note)

    async def serve(self) -> bool:
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        while True:
            try:
                reader, writer = await self.transport.connect(self.cid, self.port)
            except (ConnectionError, FileNotFoundError, OSError):
                await asyncio.sleep(self.retry)
                continue
            try:
                await receive(reader, self.mirror)
                return True
            except FilesFrameError as e:
                self.note(f"files out: stopped: the enclave broke the protocol: {e}")
                return False
            except (ConnectionError, OSError):
                await asyncio.sleep(self.retry)
            finally:
                writer.close()
