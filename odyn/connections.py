"""Open ingress and egress connections, so odyn can let them finish before it reports the end.

When the app exits, bytes it wrote may still be on their way: in odyn's relays, in socket
buffers, on the host side. Upstream reports the exit at once and the host stops the enclave,
cutting responses off. Each connection handler is tracked here; at shutdown odyn stops accepting
and waits, up to a bound, until every tracked connection has either ended or *settled*: the relay
has passed on everything the app sent and the peer's kernel has taken it (see `relay`). A settled
connection whose other direction is idle (a keep-alive client) does not hold the enclave up.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools

from odyn.transport import Handler

_settled: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("odyn_settled", default=None)


def settled() -> None:
    """Mark the current connection as settled (called by the relay of a tracked handler)."""
    event = _settled.get()
    if event is not None:
        event.set()


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
            _settled.set(event)  # this task's own context: relays started here see it
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
