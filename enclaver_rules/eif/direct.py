"""Write the EIF to disk with O_DIRECT: the disk's DMA moves the bytes, not the CPU.

A 1 GiB EIF written through the page cache costs the CPU twice more than the bytes' hashing
needs: the copy into the page cache and the kernel's writeback of it (measured here: ~0.35-2.7 s of
system time per GiB buffered and fsynced, ~0.1 s with O_DIRECT). On a machine whose cores are
busy with the PCR hashing, that system time is build time. So the writer opens the same file a
second time with O_DIRECT (through /proc/self/fd, so the atomic temporary file stays the one
`atomic_file` fsyncs and renames), gathers the chunks into page-aligned buffers (O_DIRECT needs
aligned memory, offsets and lengths) and a thread writes each whole as it fills (an O_DIRECT write
waits for the disk). The unaligned tail is written padded and the file cut back to its length.

Where O_DIRECT is not to be had (tmpfs, some network file systems: EINVAL on open or on a first
aligned write of zeros where the EIF's header will go; no /proc) the writer says so before any of
the EIF's bytes went to it, and the caller writes through the page cache as before.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
from typing import BinaryIO

from enclaver_rules.eif.pipeline import Worker
from enclaver_rules.eif.writeback import Writeback

#: One write: large enough that the device sees few requests, small enough to stay out of RSS.
BUFFER = 8 << 20
#: Buffers: one being filled while the others wait for (or are in) the flusher's write.
DEPTH = 3
#: Alignment of memory, offsets and lengths; 4 KiB covers 512-byte and 4K-sector disks.
ALIGN = 4096


#: statfs f_type of file systems kept in memory (linux/magic.h): O_DIRECT there (tmpfs takes it
#: since Linux 6.6) still copies into the page cache, so it would only add our own copy.
IN_MEMORY = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}


class Unsupported(Exception):
    """O_DIRECT cannot be used for this file; write it through the page cache."""


def _file_system(fd: int) -> int | None:
    """The statfs magic of the file system holding `fd` (None if unknown). ctypes, because os has
    statvfs, which lacks f_type; f_type is the first field (a long) on every Linux ABI."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc's, without a search for the library
        buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
        if libc.fstatfs(fd, buffer) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


class DirectWriter:
    """Appends chunks to the file open as `fd`, from byte `offset`, through a second O_DIRECT
    descriptor. The caller's thread copies chunks into one of `DEPTH` page-aligned buffers; a
    flusher thread writes full ones, so a slow disk holds the caller up only when every buffer is
    waiting for it. One thread calls `write`, then `close` (or `release`)."""

    def __init__(self, fd: int, offset: int) -> None:
        if offset % ALIGN or not hasattr(os, "O_DIRECT"):
            raise Unsupported("offset not aligned" if offset % ALIGN else "no O_DIRECT")
        if (kind := IN_MEMORY.get(_file_system(fd) or 0)) is not None:
            raise Unsupported(f"{kind}: in memory already")
        try:
            self._fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            raise Unsupported(str(e)) from None
        self._target = fd
        self._offset = offset  # where the current buffer's first byte goes
        self._buffers: list[mmap.mmap] = []
        self._flusher: Worker[tuple[int, int, int]] | None = None
        try:
            for _ in range(DEPTH):
                self._buffers.append(mmap.mmap(-1, BUFFER))  # page-aligned, as O_DIRECT needs
        except OSError as e:  # out of memory or of mappings: the page cache needs neither
            self.release()
            raise Unsupported(f"no memory for the O_DIRECT buffers: {e}") from None
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(1, DEPTH):
            self._free.put(i)
        self._current, self._used = 0, 0
        try:  # the probe: zeros where the EIF's first bytes will be written over them
            with memoryview(self._buffers[0]) as view:
                os.pwrite(self._fd, view[:ALIGN], offset)
        except OSError as e:
            self.release()
            raise Unsupported(f"O_DIRECT write refused: {e}") from None
        self._flusher = Worker("eif-direct", self._flush, depth=DEPTH)

    def write(self, chunk: bytes | memoryview) -> None:
        """Copy `chunk` into the buffers, handing each to the flusher as it fills."""
        with memoryview(chunk) as data:
            done = 0
            while done < len(data):
                n = min(len(data) - done, BUFFER - self._used)
                with memoryview(self._buffers[self._current]) as view:
                    view[self._used:self._used + n] = data[done:done + n]
                self._used += n
                done += n
                if self._used == BUFFER:
                    self._hand_over(BUFFER)

    def _hand_over(self, length: int) -> None:
        assert self._flusher is not None
        self._flusher.put((self._current, self._offset, length))
        self._offset += length
        self._current, self._used = self._free.get(), 0

    def _flush(self, job: tuple[int, int, int]) -> None:
        index, offset, length = job
        try:
            with memoryview(self._buffers[index]) as view:
                done = 0
                while done < length:
                    n = os.pwrite(self._fd, view[done:length], offset + done)
                    if n <= 0 or (n % ALIGN and done + n < length):  # the next offset would be unaligned
                        raise OSError(errno.EIO, f"short O_DIRECT write: {done + n} of {length} bytes")
                    done += n
        finally:
            self._free.put(index)  # given back even after an error: the writer never waits forever

    def close(self) -> None:
        """Write the tail (padded to the alignment, then the file cut back to its true length) and
        wait for every buffer to be on its way to the disk; raises a write's error."""
        try:
            end = self._offset + self._used
            if self._used:
                padded = -(-self._used // ALIGN) * ALIGN
                with memoryview(self._buffers[self._current]) as view:
                    view[self._used:padded] = bytes(padded - self._used)
                self._hand_over(padded)
            assert self._flusher is not None
            flusher, self._flusher = self._flusher, None
            flusher.close()
            os.ftruncate(self._target, end)  # also cuts the probe's zeros when fewer bytes came
        finally:
            self.release()

    def release(self) -> None:
        """Stop the flusher, close the descriptor and free the buffers (after `close`, or when abandoning)."""
        if self._flusher is not None:
            flusher, self._flusher = self._flusher, None
            with contextlib.suppress(BaseException):
                flusher.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for buffer in self._buffers:
            with contextlib.suppress(BufferError):  # a view still held by an error's traceback: freed with it
                buffer.close()


class FileSink:
    """Appends chunks to the open file `out` from its current position: with O_DIRECT where the
    file allows it, else through the page cache with the writeback started as it goes (writeback.py).
    One thread calls `write`; `close` finishes (raising a write's or a sync's error); `release`
    gives the resources back without finishing, after a failure. The caller still fsyncs `out`
    (data written with O_DIRECT may sit in the disk's own cache until then). `size`, when known:
    a file smaller than one buffer goes through the page cache (O_DIRECT's DEPTH buffers and its
    thread would cost more than the copy they save)."""

    def __init__(self, out: BinaryIO, size: int | None = None) -> None:
        self._out = out
        self._direct: DirectWriter | None = None
        self._writeback: Writeback | None = None
        out.flush()
        try:
            if size is not None and size < BUFFER:
                raise Unsupported(f"{size} bytes: smaller than one buffer")
            self._direct = DirectWriter(out.fileno(), out.tell())
        except Unsupported:
            self._writeback = Writeback(out.fileno())

    @property
    def direct(self) -> bool:
        return self._direct is not None

    def write(self, chunk: bytes) -> None:
        if self._direct is not None:
            self._direct.write(chunk)
            return
        self._out.write(chunk)
        if self._writeback is not None:
            self._writeback.wrote(len(chunk))

    def close(self) -> None:
        try:
            if self._direct is not None:
                self._direct.close()
                self._out.seek(0, os.SEEK_END)  # the buffered file's position, for the caller
            else:
                self._out.flush()
        finally:
            self.release()

    def release(self) -> None:
        if self._direct is not None:
            self._direct.release()
        if self._writeback is not None:
            writeback, self._writeback = self._writeback, None
            writeback.close()
