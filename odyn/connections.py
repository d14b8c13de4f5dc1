"""Open ingress and egress connections, so odyn can let them finish before it reports the end.

When the app exits, bytes it wrote may still be on their way: in odyn's relays, in socket
buffers, on the host side. Upstream reports the exit at once and the host stops the enclave,
cutting responses off. Each connection handler is tracked here; at shutdown odyn stops accepting
and waits, up to a bound, until every tracked connection has either ended or *settled*: the relay
has passed on everything the app sent and the peer's kernel has taken it (`enclaver_rules.link.relay`
sets the event this module puts in its `SETTLED`). A settled connection whose other direction is
idle (a keep-alive client) does not hold the enclave up.

Each listener also has a `Gate`: at most so many connections at once (a client that opens
connections without end must not take every file descriptor odyn has); one over the limit is
refused at once, and a log line says so, at most once per interval with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import Callable

from enclaver_rules.link.relay import SETTLED
from enclaver_rules.link.transport import Handler


async def _ended_or_settled(task: asyncio.Task[None], event: asyncio.Event) -> None:
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


class Connections:
    def __init__(self) -> None:
        self._open: dict[asyncio.Task[None], asyncio.Event] = {}

    def __len__(self) -> int:
        return len(self._open)

    def track(self, handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            event = asyncio.Event()
            self._open[task] = event
            SETTLED.set(event)  # this task's own context: relays started here see it
            try:
                await handler(reader, writer)
            finally:
                self._open.pop(task, None)

        return tracked

    async def drain(self, timeout: float) -> tuple[int, int]:
        """Wait up to `timeout` seconds for every open connection to end or settle, then close them
        all. Returns (ended or settled in time, cut off)."""
        pending = dict(self._open)
        if not pending:
            return 0, 0
        waiters = [asyncio.ensure_future(_ended_or_settled(t, e)) for t, e in pending.items()]
        done, late = await asyncio.wait(waiters, timeout=max(timeout, 0))
        for waiter in late:
            waiter.cancel()
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return len(done), len(late)


# -- limits and the lines that report them --------------------------------------------------------

MAX_CONNECTIONS = 256  # per listener; each relayed connection holds two file descriptors
LOG_EVERY = 10.0  # seconds between two lines about the same limit or the same kind of fault

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


_sinks: list[Log] = [_stderr]


def set_log(sink: Log | None) -> None:
    """Where odyn's network services write their lines (default odyn's stderr; the supervisor
    may point it at its log ring)."""
    _sinks[0] = sink if sink is not None else _stderr


def log(line: str) -> None:
    _sinks[0](line)


MAX_KEYS = 256  # keys a Throttle remembers: the app picks some of them (a denied destination)


class Throttle:
    """One line per `every` seconds per key; the next one says how many were held back. At most
    `max_keys` keys are remembered (the oldest is forgotten first), since the app may choose them."""

    def __init__(self, sink: Log | None = None, every: float = LOG_EVERY, max_keys: int = MAX_KEYS) -> None:
        self.sink, self.every, self.max_keys = sink, every, max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, line: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is None and len(self._last) >= self.max_keys:
            oldest = next(iter(self._last))
            del self._last[oldest]
            self._held.pop(oldest, None)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last.pop(key, None)  # re-inserted: the table's order is the order of last use
        self._last[key] = now
        held = self._held.pop(key, 0)
        suffix = f" ({held} more like it in the last {now - last:.0f} s)" if held and last is not None else ""
        (self.sink or log)(line + suffix)


class Gate:
    """At most `limit` connections at once on one listener: `enter` says whether one more may
    come in (and logs, throttled, when it may not); `leave` when it has ended."""

    def __init__(self, name: str, limit: int = MAX_CONNECTIONS, sink: Log | None = None,
                 every: float = LOG_EVERY) -> None:
        if limit < 1:
            raise ValueError("a connection limit must be at least 1")
        self.name, self.limit = name, limit
        self.open = 0
        self.refused = 0  # in all
        self._say = Throttle(sink, every)

    def enter(self) -> bool:
        if self.open >= self.limit:
            self.refused += 1
            self._say("limit", f"odyn: {self.name}: connection limit reached ({self.limit} open): "
                               f"refusing new connections until some end")
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1
