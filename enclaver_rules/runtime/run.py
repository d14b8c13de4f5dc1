"""The host side of a running enclave, whatever runs it (nitro-cli on a Nitro host, or the simulator).

Transport-agnostic: it speaks to the enclave through a `Transport` (AF_VSOCK, or Unix sockets in a
directory for the simulator and tests) and asks the `Enclave` it was given only to stop, and whether
it has ended. What it does, as upstream's `enclaver-run` (compat notes §4) plus what upstream lacks:

* egress: `HostEgress` on vsock EGRESS_PORT with the manifest's policy (checked again here), listening
  before the enclave starts, as upstream;
* ingress: one TCP listener per `-p [IP:]HOST_PORT:PORT`, each connection relayed to the enclave's
  vsock port PORT; only ports the manifest lists under `ingress`, and only those asked for (nothing is
  published unless asked, as with `docker run`);
* status: the stream on STATUS_PORT is followed (reconnecting while the enclave lives) until a final
  status; `running` sends sd_notify READY, the end STOPPING;
* logs: the stream on LOGS_PORT goes to a sink chunk by chunk until its end;
* a stop (SIGTERM/SIGINT in the caller, `stop()` here) asks the enclave to stop, then drains: the final
  status and the log to its end, each within `drain_timeout`.

Exit code: the app's (0–255), 107 the app was killed by a signal, 108 odyn failed, 109 interrupted
(stopped from the host side), 1 the enclave ended without a final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.link import logs
from enclaver_rules.link.relay import splice
from enclaver_rules.link.status import MAX_LINE, Status
from enclaver_rules.link.transport import Transport
from enclaver_rules.manifest.model import Manifest
from enclaver_rules.ports import LOGS_PORT, STATUS_PORT
from enclaver_rules.runtime.egress_host import HostEgress
from enclaver_rules.runtime.files_out import FilesOut
from enclaver_rules.runtime.systemd import Notifier

log = logging.getLogger("enclaver.run")

EXIT_INTERRUPTED = 109  # upstream: the host side was stopped by a signal
EXIT_NO_STATUS = 1  # the enclave ended and never said how
RETRY = 0.25  # seconds between connection attempts (upstream's)
_PUBLISH = re.compile(r"^(?:(?P<ip>\[[0-9A-Fa-f:.]+\]|[0-9.]+):)?(?P<host>\d{1,5}):(?P<port>\d{1,5})$")


@dataclass(frozen=True, slots=True)
class Publish:
    """`-p [IP:]HOST_PORT:PORT`: TCP HOST_PORT on IP (default 0.0.0.0, as docker) → the enclave's PORT."""

    host_port: int
    port: int
    host_ip: str = "0.0.0.0"

    @classmethod
    def parse(cls, text: str) -> Publish:
        match = _PUBLISH.match(text)
        if match is None or not all(0 < int(match[g]) < 65536 for g in ("host", "port")):
            raise InvalidInput(f"-p {text!r}: not [IP:]HOST_PORT:PORT", field="-p",
                               fix="for example -p 8080:8080 or -p 127.0.0.1:9000:8080 (ports 1-65535)")
        return cls(int(match["host"]), int(match["port"]), (match["ip"] or "0.0.0.0").strip("[]"))

    def __str__(self) -> str:
        ip = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{ip}:{self.host_port}:{self.port}"


def check_publish(manifest: Manifest, publish: tuple[Publish, ...]) -> None:
    """Every -p names a port the manifest's ingress lists; all wrong ones are reported at once."""
    ports = {i.listen_port for i in manifest.ingress}
    wrong = [p for p in publish if p.port not in ports]
    if wrong:
        listed = ", ".join(str(p) for p in sorted(ports)) or "none"
        raise InvalidInput(f"-p {', '.join(str(p) for p in wrong)}: the manifest's ingress does not list "
                           f"{', '.join(str(p.port) for p in wrong)} (it lists: {listed})", field="-p",
                           fix="publish only ports under `ingress:` in enclaver.yaml; an enclave serves no others")


class Enclave(Protocol):
    """What the host side needs of a started enclave. Both calls may block (they run in a thread)."""

    cid: int

    def stop(self) -> None:
        """Ask it to stop: gracefully where the backend can (the simulator sends SIGTERM to odyn,
        which forwards it to the app); nitro-cli can only terminate."""

    def gone(self) -> bool:
        """Whether it has ended (no status will come any more)."""


@dataclass
class HostSide:
    transport: Transport
    manifest: Manifest
    publish: tuple[Publish, ...] = ()
    on_log: Callable[[bytes], object] = lambda data: None
    on_status: Callable[[Status], object] = lambda status: None
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    egress: HostEgress | None = None
    outputs_dir: str | None = None  # where the manifest's outputs: are mirrored (files_out); None: not collected
    drain_timeout: float = 30.0
    connect_timeout: float = 120.0
    cid: int | None = field(default=None, init=False)
    interrupted: bool = field(default=False, init=False)
    final: Status | None = field(default=None, init=False)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list, init=False)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _streams: list[asyncio.StreamWriter] = field(default_factory=list, init=False)

    async def listen(self) -> None:
        """Egress and ingress listeners, before the enclave starts; a port that cannot be bound fails
        the run here, with nothing started."""
        check_publish(self.manifest, self.publish)
        try:
            if self.egress is not None:
                self._servers.append(await self.egress.serve())
            for publish in self.publish:
                server = await asyncio.start_server(functools.partial(self._ingress, port=publish.port),
                                                    publish.host_ip, publish.host_port)
                self._servers.append(server)
        except OSError as e:
            await self.close()
            raise OperationFailed(f"cannot listen: {e.strerror or e}",
                                  fix="free the port, or publish on another with -p HOST_PORT:PORT") from None

    async def _ingress(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        if self.cid is None:
            writer.transport.abort()
            return
        try:
            upstream = await self.transport.connect(self.cid, port)
        except OSError as e:
            log.info("ingress %d: the enclave does not answer: %s", port, e)
            writer.transport.abort()
            return
        await splice((reader, writer), upstream)

    def stop(self) -> None:
        """Ask for a stop (from a signal handler): the enclave is stopped and the host side drains."""
        self.interrupted = True
        self._stop.set()

    async def follow(self, enclave: Enclave) -> int:
        """Follow status and logs of a started enclave until its final status (or a stop, then a drain)."""
        self.cid = enclave.cid
        status = asyncio.ensure_future(self._follow_status(enclave))
        logs_done = asyncio.ensure_future(self._follow_logs(enclave))
        stopping = asyncio.ensure_future(self._stop.wait())
        files = asyncio.ensure_future(self._follow_files(enclave))
        try:
            await asyncio.wait({status, stopping}, return_when=asyncio.FIRST_COMPLETED)
            self.notifier.stopping("stopping" if not status.done() else "the app ended")
            if not status.done():
                log.info("stopping the enclave")
                await asyncio.to_thread(enclave.stop)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(status), self.drain_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(logs_done), self.drain_timeout)
            with contextlib.suppress(TimeoutError):  # odyn sends a last scan of the outputs, then ends them
                await asyncio.wait_for(asyncio.shield(files), self.drain_timeout)
        finally:
            for task in (status, logs_done, stopping, files):
                task.cancel()
            await asyncio.gather(status, logs_done, stopping, files, return_exceptions=True)
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.final is None:
            return EXIT_NO_STATUS
        return self.final.exit_code()

    async def _connect(self, enclave: Enclave, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect to the enclave's port, retrying while it lives (odyn may not listen yet)."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                reader, writer = await self.transport.connect(enclave.cid, port)
                self._streams.append(writer)  # referenced: a collected StreamWriter closes its connection
                return reader, writer
            except OSError as e:
                if await asyncio.to_thread(enclave.gone):
                    return None
                if time.monotonic() > deadline:
                    raise OperationFailed(f"the enclave's port {port} did not answer within "
                                          f"{self.connect_timeout:g} s: {e}", fix="see the enclave's console") from None
            await asyncio.sleep(RETRY)

    async def _follow_status(self, enclave: Enclave) -> None:
        last: Status | None = None
        while self.final is None:
            connected = await self._connect(enclave, STATUS_PORT)
            if connected is None:
                return
            reader = connected[0]
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break  # closed without a final status: connect again while the enclave lives
                except asyncio.LimitOverrunError:
                    log.warning("status line longer than the reader's limit; skipped")
                    reader = connected[0]
                    break
                except OSError:
                    break
                if len(line) > MAX_LINE * 64:
                    continue
                try:
                    status = Status.parse(line)
                except ValueError as e:
                    log.warning("enclave status: %s", e)
                    continue
                if status != last:
                    last = status
                    self.on_status(status)
                if status.state == "running":
                    self.notifier.ready("the app is running")
                if status.final:
                    self.final = status
                    return
            if await asyncio.to_thread(enclave.gone):
                return
            await asyncio.sleep(RETRY)

    async def _follow_files(self, enclave: Enclave) -> None:
        """Mirror the manifest's `outputs:` under `outputs_dir` until odyn ends the stream."""
        if not self.manifest.outputs or self.outputs_dir is None:
            return
        prefixes = tuple(p.strip("/") for p in self.manifest.outputs)
        await FilesOut(self.transport, enclave.cid, self.outputs_dir, prefixes=prefixes).serve()

    async def _follow_logs(self, enclave: Enclave) -> None:
        connected = await self._connect(enclave, LOGS_PORT)
        if connected is None:
            return
        with contextlib.suppress(OSError):
            await logs.follow(connected[0], self.on_log)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._servers.clear()
        for writer in self._streams:
            writer.transport.abort()
        self._streams.clear()


class LinePrefixer:
    """Log chunks → lines with a prefix (the stream is bytes split anywhere); `flush` the rest."""

    def __init__(self, prefix: bytes, write: Callable[[bytes], object]) -> None:
        self.prefix, self.write, self.pending = prefix, write, b""

    def __call__(self, data: bytes) -> None:
        data = self.pending + data
        *lines, self.pending = data.split(b"\n")
        if lines:
            self.write(b"".join(self.prefix + line + b"\n" for line in lines))

    def flush(self) -> None:
        if self.pending:
            self.write(self.prefix + self.pending + b"\n")
            self.pending = b""



async def run(side: HostSide, start: Callable[[], Enclave],
              signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> int:
    """Listen, start the enclave (in a thread: `start` may block), follow it; SIGTERM/SIGINT stop it
    and drain. The listeners are closed on every path; the enclave's own clean-up is the caller's."""
    loop = asyncio.get_running_loop()
    for number in signals:
        loop.add_signal_handler(number, side.stop)
    try:
        await side.listen()
        enclave = await asyncio.to_thread(start)
        return await side.follow(enclave)
    finally:
        for number in signals:
            loop.remove_signal_handler(number)
        await side.close()
