"""Files out: odyn copies the files under the manifest's `outputs:` to each reader of vsock 17003.

Like `tail -F` over directories: every regular file is sent from its start, then whatever is
appended; a file replaced (new inode, as log rotation's rename-and-create does), truncated, or
rewritten in place (the last bytes sent changed: copytruncate) is announced again, from its start. Frames are `enclaver_rules.link.files`.

Read-only by construction: the connection's incoming side is never read, and odyn only opens
files for reading. Walking never follows a symlink (directories are opened with O_NOFOLLOW
relative to their parent's descriptor, files with O_NOFOLLOW and checked to be regular), so a link
the app plants cannot make odyn send anything from outside the listed directories. Bounded: at
most MAX_FILES files and MAX_DEPTH levels per output, one frame of data at a time per reader
(written only after the previous one drained), and files that vanish are forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from enclaver_rules.link.files import MAX_DATA, FilesFrameError, data_frame, file_frame

MAX_FILES = 1024
MAX_DEPTH = 8
DEFAULT_POLL = 0.25  # seconds between scans
TAIL = 64  # bytes re-read each scan to notice a file rewritten in place


def _walk(dir_fd: int, prefix: str, depth: int, budget: list[int]) -> Iterator[tuple[str, int]]:
    """(name, open read-only descriptor) of each regular file under `dir_fd`; the caller closes them."""
    try:
        entries = sorted(os.scandir(dir_fd), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if budget[0] <= 0:
            return
        name = f"{prefix}/{entry.name}"
        try:
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                if depth >= MAX_DEPTH:
                    continue
                sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    yield from _walk(sub, name, depth + 1, budget)
                finally:
                    os.close(sub)
            elif entry.is_file(follow_symlinks=False):
                fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a FIFO or device meanwhile
                    os.close(fd)
                    continue
                budget[0] -= 1
                yield name, fd
        except OSError:  # vanished, swapped for a symlink (ELOOP), unreadable: skip it this round
            continue


def regular_files(directory: str) -> Iterator[tuple[str, int]]:
    """(wire name, descriptor) of every regular file under `directory`; the wire name is the file's
    absolute path without its leading `/`."""
    try:
        top = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return  # not there (yet): the app may create it later
    try:
        yield from _walk(top, directory.strip("/"), 0, [MAX_FILES])
    finally:
        os.close(top)


@dataclass
class FilesOut:
    directories: tuple[str, ...]
    poll: float = DEFAULT_POLL
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        """The app has exited: every reader gets one last scan, then end-of-stream."""
        self._closing.set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent: dict[str, _Sent] = {}
        try:
            while True:
                last = self._closing.is_set()
                await self._scan(writer, sent)
                if last:
                    writer.write_eof()
                    await writer.drain()
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.poll)
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def _scan(self, writer: asyncio.StreamWriter, sent: dict[str, _Sent]) -> None:
        seen = set()
        for directory in self.directories:
            for name, fd in regular_files(directory):
                try:
                    seen.add(name)
                    await self._send(writer, sent, name, fd)
                except FilesFrameError:  # a name the host would refuse (not UTF-8, too long): skip it
                    continue
                finally:
                    os.close(fd)
        for gone in set(sent) - seen:
            del sent[gone]

    async def _send(self, writer: asyncio.StreamWriter, sent: dict[str, _Sent], name: str, fd: int) -> None:
        info = os.fstat(fd)
        state = sent.get(name)
        if state is None or (state.dev, state.ino) != (info.st_dev, info.st_ino):
            state = sent[name] = _Sent(info.st_dev, info.st_ino)
            writer.write(file_frame(name, state.identity(), info.st_size))
        elif info.st_size < state.offset or (state.tail and os.pread(fd, len(state.tail), state.offset - len(state.tail)) != state.tail):
            # truncated, or truncated and rewritten past where we were (copytruncate): start over, with a
            # new generation so the receiver starts over too
            state.generation += 1
            state.offset, state.tail = 0, b""
            writer.write(file_frame(name, state.identity(), info.st_size))
        while state.offset < info.st_size:
            data = os.pread(fd, min(MAX_DATA, info.st_size - state.offset), state.offset)
            if not data:
                break  # truncated under us: the next scan announces it
            writer.write(data_frame(name, state.offset, data))
            state.offset += len(data)
            state.tail = (state.tail + data)[-TAIL:]
            await writer.drain()
        await writer.drain()


@dataclass
class _Sent:
    """What one reader was sent of one file: which file (device, inode, generation) and how far.
    `tail` (the last bytes sent) is read again each scan: if it changed, the file was rewritten."""

    dev: int
    ino: int
    generation: int = 0
    offset: int = 0
    tail: bytes = b""

    def identity(self) -> bytes:
        return struct.pack(">QQQ", self.dev, self.ino, self.generation)
