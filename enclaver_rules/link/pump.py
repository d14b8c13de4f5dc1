"""One relay direction moved by the kernel: socket → pipe → socket with `splice(2)`, no copy in Python
(or, from sources where splice does not pay, through one reused buffer).

Why: the protocol relay copies every byte twice (recv into a fresh bytes object, send out of it),
and `_copy_to_iter`/`_copy_from_iter` were over a third of odyn's CPU on the ingress download path
(perf, benchmarks/proxy_throughput.py), where it ran at 0.55–0.66× `socat -b 262144`. With splice,
TCP receive pages are referenced into the pipe and from there handed to the outgoing socket.

A `Pump` takes over one direction of a `relay._Link` after the streams were taken over: it owns
the source socket's *reader* slot and the destination socket's *writer* slot in the event loop
(the transports keep the other two, for the other direction), so the source transport stays
paused and the destination transport's write buffer stays empty. Everything else is the relay's:
the pump calls the half's `eof_received` once the pipe has drained (half-close and EOF exactly as
before), sets the link's `moved` (idle timer), and aborts the link on a socket error, as a
transport's fatal error would. Backpressure: reading stops while the pipe holds bytes the
destination did not take, and resumes once it drained.

Only TCP sources are spliced (see `SOURCES`); from others (Unix, vsock) a pump reads into one
256 KiB buffer it keeps and writes from it: the same two copies as the transports, without a fresh
bytes object per read nor the transport's buffering. Fallbacks, so nothing depends on splice working: no
pump (the copying relay) when there is a filter, TLS, no socket, a source of another family, an
event loop without the selector internals, no pipe to be had, or more than `MAX_PUMPS` at once
(each costs two descriptors, and the connection limits were set for two per connection); and if
splice itself refuses a socket (EINVAL and kin), whatever sits in the pipe goes to the destination
transport and the direction goes back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import Any

PIPE_SIZE = 1 << 20  # per direction; F_SETPIPE_SZ may refuse (over the user's pipe quota): 64 KiB then
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
MAX_PUMPS = 64  # at once, in this process: at most 128 descriptors (pipes) or 16 MiB (buffers) beyond the relays' own
UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
#: Families read with splice: TCP's splice_read hands its receive pages to the pipe. AF_UNIX's costs
#: more than recv (Unix → TCP was 0.6-0.75× socat -b 262144 spliced, 0.8-1.0× copied, A/B on the same
#: machine), and AF_VSOCK's is the generic read-into-pipe copy at best: both are copied (`copy`).
SOURCES = {socket.AF_INET, socket.AF_INET6}
COPY_SIZE = 256 << 10  # other sources: one recv's worth, what asyncio's transports read at a time
_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 2) | getattr(os, "SPLICE_F_MOVE", 1)

_open = [0]  # pumps alive now


class Pump:
    """Move what `src` reads to `dst`'s socket through a pipe (`copy`: through a buffer). `eof` is called once the source
    ended and the pipe drained; `moved` on every byte moved; `fail` on a socket error;
    `fallback` when splice refused: the caller gets the direction back (pipe already emptied)."""

    def __init__(self, loop: Any, src: asyncio.Transport, dst: asyncio.Transport, *, eof: Callable[[], object],
                 moved: Callable[[], object], fail: Callable[[], object], fallback: Callable[[], object],
                 copy: bool = False) -> None:
        self.loop, self.src, self.dst = loop, src, dst
        self.src_fd: int = src.get_extra_info("socket").fileno()
        self.dst_fd: int = dst.get_extra_info("socket").fileno()
        self._eof, self._moved, self._fail, self._fallback = eof, moved, fail, fallback
        self.copy = copy  # read into one reused buffer and write from it, where splice does not pay
        self.buf = memoryview(bytearray(COPY_SIZE)) if copy else memoryview(b"")
        self.sent = 0  # copy: bytes of `buf` already written
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if not copy else (-1, -1)
        _open[0] += 1
        self.size = 1 << 16 if not copy else COPY_SIZE  # the default capacity: what one splice may bring in
        with contextlib.suppress(OSError, ValueError):
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
            self.size = fcntl.fcntl(self.pipe_w, F_GETPIPE_SZ)
        self.pending = 0  # bytes in the pipe
        self.ended = False  # the source's EOF came; passed on once the pipe is empty
        self.reading = self.writing = self.stopped = False

    def start(self) -> None:
        self._read_on()

    # -- the loop's slots (selector internals: the public add_reader refuses a transport's fd) --

    def _read_on(self) -> None:
        if not self.reading and not self.stopped:
            self.loop._add_reader(self.src_fd, self._readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.loop._remove_reader(self.src_fd)
            self.reading = False

    def _write_on(self) -> None:
        if not self.writing and not self.stopped:
            self.loop._add_writer(self.dst_fd, self._writable)
            self.writing = True

    def _write_off(self) -> None:
        if self.writing:
            self.loop._remove_writer(self.dst_fd)
            self.writing = False

    # -- moving ---------------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            n = os.readv(self.src_fd, [self.buf]) if self.copy else os.splice(self.src_fd, self.pipe_w, self.size,
                                                                               flags=_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._error(e)
            return
        if n == 0:
            self.ended = True
            self._read_off()
            self._finish()
            return
        self.pending += n
        self.sent = 0
        self._moved()
        self._drain()

    def _writable(self) -> None:
        self._drain()

    def _drain(self) -> None:
        """Pipe (or buffer) → destination until empty (then read again) or the destination is full (then wait)."""
        while self.pending:
            try:
                if self.copy:
                    n = os.write(self.dst_fd, self.buf[self.sent:self.sent + self.pending])
                    self.sent += n
                else:
                    n = os.splice(self.pipe_r, self.dst_fd, self.pending, flags=_FLAGS)
            except (BlockingIOError, InterruptedError):
                self._read_off()
                self._write_on()
                return
            except OSError as e:
                self._error(e)
                return
            if n == 0:  # cannot happen while the pipe holds bytes; do not spin if it does
                self._fail_now()
                return
            self.pending -= n
        self._write_off()
        if self.ended:
            self._finish()
        else:
            self._read_on()

    def _finish(self) -> None:
        if not self.pending and not self.stopped:
            self.stop()
            self._eof()

    def _error(self, e: OSError) -> None:
        if e.errno in UNSUPPORTED:
            self._give_back()
        else:
            self._fail_now()

    def _fail_now(self) -> None:
        self.stop()
        self._fail()

    def _give_back(self) -> None:
        """splice is not supported here: what the pipe holds goes out through the transport."""
        data = bytearray(self.buf[self.sent:self.sent + self.pending]) if self.copy else bytearray()
        with contextlib.suppress(OSError):
            while self.pending and (chunk := os.read(self.pipe_r, self.pending)):
                data += chunk
                self.pending -= len(chunk)
        self.stop()
        if data:
            self.dst.write(bytes(data))
        self._fallback()

    def stop(self) -> None:
        """Leave the loop's slots and close the pipe; idempotent. Must run before either socket
        is closed (the relay calls it from connection_lost, which runs before the close)."""
        if self.stopped:
            return
        self._read_off()
        self._write_off()
        self.stopped = True
        for fd in (self.pipe_r, self.pipe_w) if not self.copy else ():
            with contextlib.suppress(OSError):
                os.close(fd)
        _open[0] -= 1


def can_pump(loop: Any, src: asyncio.Transport, dst: asyncio.Transport) -> bool:
    """Whether a pump may take this direction (see the module's docstring for why not)."""
    if _open[0] >= MAX_PUMPS or not hasattr(os, "splice"):
        return False
    if not all(hasattr(loop, m) for m in ("_add_reader", "_remove_reader", "_add_writer", "_remove_writer")):
        return False
    for transport in (src, dst):
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_extra_info("sslcontext") is not None or transport.is_closing():
            return False
    return dst.get_write_buffer_size() == 0  # what was written before must leave first


def make_pump(loop: Any, src: asyncio.Transport, dst: asyncio.Transport, **callbacks: Callable[[], object]) -> Pump | None:
    """A pump, or None when none is to be had (no descriptors left for a pipe)."""
    if not can_pump(loop, src, dst):
        return None
    try:
        return Pump(loop, src, dst, copy=src.get_extra_info("socket").family not in SOURCES, **callbacks)
    except OSError:
        return None
