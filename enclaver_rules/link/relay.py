"""Copy bytes both ways between two streams, byte for byte, honouring half-close.

When one side ends its writing (EOF), the other side's write end is shut too, and the copy the
other way goes on until it ends as well: TLS close_notify, HTTP/1.0 and raw protocols all see
exactly what their peer sent. An idle timeout ends connections on which nothing moved, either way.

The direction *out of the app* is marked: once it has ended, the relay waits until the peer's
kernel has taken every byte (SIOCOUTQ reaches 0 where the socket family reports it) and then marks
the connection settled: it sets the event in `SETTLED`, if the task that runs the relay has one
(odyn's `connections` gives each tracked connection one: shutdown waits for it; elsewhere nothing
is set and nothing waits).

A direction can be given a *filter* (the egress proxy's body framer: it passes on a request body
exactly as framed and nothing after it); it sees every chunk, the bytes taken over from the stream
included, and a ValueError from it aborts both sides. Without one, the data path has no per-chunk
work but a `None` check.

The handlers get streams (for heads and handshakes); `splice` then takes both transports over
with `set_protocol` and copies with protocol callbacks: each chunk the transport reads goes
straight to the other transport's `write`, and reading pauses while the other side's write
buffer is over its high-water mark. No StreamReader in the data path: its feed_data and read()
copy every chunk three times and pause and resume the transport for each one, which halved
throughput against socat and doubled the CPU per byte (benchmarks/proxy_throughput.py).

Where it can, a direction without a filter between plain sockets goes to a `pump.Pump` instead:
spliced through a pipe from TCP (no copy through Python: the ingress download path went from
0.55-0.66× socat -b 262144 to above it), through one reused buffer from Unix and vsock sockets.
The transports stay for everything else, and take a direction back if splice is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import socket
import struct
import time
from collections.abc import Callable
from typing import Literal

from enclaver_rules.link.pump import Pump, make_pump

IDLE_TIMEOUT = 300.0
CLOSE_TIMEOUT = 10.0
SIOCOUTQ = 0x5411  # bytes the peer has not yet taken (TCP: unacked too; Unix: unread)
UNIX_SNDBUF = 1 << 20  # more than one read (asyncio reads up to 256 KiB), so a chunk leaves in one send

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Filter = Callable[[bytes], bytes]  # what of a chunk to pass on; raises ValueError on a protocol error

#: The current connection's "settled" event, set by whoever tracks connections (odyn's `connections`).
SETTLED: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("odyn_settled", default=None)


def settled() -> None:
    """Mark the current connection as settled (called by the relay of a tracked handler)."""
    event = SETTLED.get()
    if event is not None:
        event.set()


def unsent(transport: asyncio.BaseTransport) -> int | None:
    """Bytes still queued towards the peer, in our buffer and in the kernel; None if unknown."""
    queued = transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return queued or None
    try:
        kernel: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):  # the family does not say (older AF_VSOCK), or closed
        return queued or None
    return queued + kernel


class _Half(asyncio.Protocol):
    """One side of a splice: what its transport reads is written to the other side's transport.
    (Not a BufferedProtocol: from Python 3.12 a transport keeps a view of what it could not send
    at once, so a reused receive buffer would be overwritten under it; fresh bytes are safe.)"""

    def __init__(self, link: _Link, transport: asyncio.Transport) -> None:
        self.link, self.transport, self.peer = link, transport, self
        self.over_tls = transport.get_extra_info("sslcontext") is not None
        self.ended: asyncio.Future[None] = link.loop.create_future()  # EOF passed on, or connection gone
        self.lost: asyncio.Future[None] = link.loop.create_future()
        self.eof = False
        self.filter: Filter | None = None  # applied to what this side reads, before the peer gets it
        self.pump: Pump | None = None  # moves what this side reads to the peer with splice, if it can

    def data_received(self, data: bytes) -> None:
        self.link.moved = True
        if self.filter is not None:
            try:
                data = self.filter(data)
            except ValueError as e:
                self.link.fail(e)
                return
            if not data:
                return
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        _done(self.ended)
        if self.peer.eof:  # both directions have ended
            self.link.close()
        return not self.over_tls  # keep our write side open, the other direction may go on (not in TLS)

    def pause_writing(self) -> None:  # our write buffer is full: stop reading the side that fills it
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.eof:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        for half in (self, self.peer):  # our pump reads this socket, the peer's writes to it: before it closes
            if half.pump is not None:
                half.pump.stop()
        _done(self.ended)
        _done(self.lost)
        if exc is not None:
            self.peer.transport.abort()
        else:
            self.peer.transport.close()  # nothing more can reach this side; the peer gets what is queued


def _done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Link:
    """Two transports taken over from their streams, and an idle timer for the pair."""

    def __init__(self, a: Stream, b: Stream, idle: float, filters: tuple[Filter | None, Filter | None] = (None, None),
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle, self.moved = idle, False
        self.on_error = on_error
        self.error: Exception | None = None
        self.a, self.b = _Half(self, _transport(a[1])), _Half(self, _transport(b[1]))
        self.a.peer, self.b.peer = self.b, self.a
        self.a.filter, self.b.filter = filters
        taken = [(half, *_take_over(half, reader)) for half, (reader, _) in ((self.a, a), (self.b, b))]
        for half, data, eof, gone, exc in taken:  # what the streams had read, then their ends
            if data:
                half.data_received(data)
            if gone:
                half.connection_lost(exc)
            elif eof:
                half.eof_received()
        for half in (self.a, self.b):  # else the peer's resume_writing resumes it
            ready = not (half.eof or half.transport.is_closing() or _over_high_water(half.peer.transport))
            if ready and (half.filter is not None or not self._pump(half)):
                half.transport.resume_reading()
        self.timer = self.loop.call_later(idle, self._check_idle)

    def _pump(self, half: _Half) -> bool:
        """Give `half`'s direction to a splice pump (see `pump`); False: the transports copy it."""

        def moved() -> None:
            self.moved = True

        def fallback() -> None:  # splice refused: the transports copy this direction from now on
            half.pump = None
            if not (half.eof or half.transport.is_closing() or _over_high_water(half.peer.transport)):
                half.transport.resume_reading()

        pump = make_pump(self.loop, half.transport, half.peer.transport, eof=half.eof_received, moved=moved,
                         fail=self.abort, fallback=fallback)
        if pump is None:
            return False
        half.pump = pump
        pump.start()
        return True

    def _check_idle(self) -> None:
        if self.moved:
            self.moved = False
            self.timer = self.loop.call_later(self.idle, self._check_idle)
        else:
            self.abort()

    def close(self) -> None:
        self.a.transport.close()
        self.b.transport.close()

    def abort(self) -> None:
        self.a.transport.abort()
        self.b.transport.abort()

    def fail(self, error: Exception) -> None:
        """A filter refused what one side sent: nothing more passes either way."""
        if self.error is None:
            self.error = error
            if self.on_error is not None:
                self.on_error(error)
        self.abort()


def _take_over(half: _Half, reader: asyncio.StreamReader) -> tuple[bytes, bool, bool, Exception | None]:
    """Point the transport at `half`; return what the stream had read that nobody consumed, whether
    its EOF had come, whether the connection is already gone, and with which error."""
    half.transport.pause_reading()
    sock = half.transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        # unix:DIR transports (simulator, tests): the default ~208 KiB is less than one read, so
        # every chunk would need a second send after a round through epoll
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
    gone = half.transport.is_closing()
    if not gone:
        half.transport.set_protocol(half)
    # StreamReader keeps its buffer and EOF private (both unchanged from Python 3.4 to 3.13)
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    data, eof = bytes(buffer), bool(reader._eof)  # type: ignore[attr-defined]
    buffer.clear()
    exc = reader.exception()
    return data, eof, gone, exc if isinstance(exc, Exception) else None


def _transport(writer: asyncio.StreamWriter) -> asyncio.Transport:
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)
    return transport


def _over_high_water(transport: asyncio.Transport) -> bool:
    return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]


async def _settle(transport: asyncio.BaseTransport, limit: float) -> None:
    deadline = time.monotonic() + limit
    while unsent(transport) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    settled()


async def splice(a: Stream, b: Stream, *, first_to_b: bytes = b"", first_to_a: bytes = b"",
                 idle: float = IDLE_TIMEOUT, app: Literal["a", "b"] | None = None, to_b: Filter | None = None,
                 to_a: Filter | None = None, on_error: Callable[[Exception], None] | None = None) -> None:
    """Relay a ⇄ b until both directions have ended; then close both. `app` names the side that is
    the app, whose outgoing direction settles the connection. `to_b` filters what a sends (not
    `first_to_b`, which the caller passes on as it is), `to_a` what b sends (not `first_to_a`); a
    ValueError from either aborts both sides and is handed to `on_error`. `idle` ends the pair when
    nothing moved either way for that long. The streams are spent afterwards."""
    if first_to_b:
        b[1].write(first_to_b)
    if first_to_a:
        a[1].write(first_to_a)
    link = _Link(a, b, idle, (to_b, to_a), on_error)
    try:
        if app is not None:
            source = link.a if app == "a" else link.b
            await source.ended
            if not source.peer.lost.done():
                await _settle(source.peer.transport, idle)
        await asyncio.gather(link.a.lost, link.b.lost)
    except asyncio.CancelledError:  # shut down (flush bound over): drop what a peer never took
        link.abort()
        raise
    finally:
        link.timer.cancel()
        link.close()
        try:
            await asyncio.wait_for(asyncio.gather(link.a.lost, link.b.lost), CLOSE_TIMEOUT)
        except TimeoutError:
            link.abort()  # a peer that stopped reading must not hold us forever
