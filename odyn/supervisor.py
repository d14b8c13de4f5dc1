"""odyn's supervisor: start the app, carry its status and logs out, reap, forward signals, exit.

Order matters (compat notes §5): the status and log services come up first, so that anything
failing later is still reported. Then the app starts with the image's environment. Every child is
reaped (PID 1 inherits orphans); the app's own status ends the run. SIGTERM and SIGINT are passed
to the app's process group (upstream forwards nothing, so apps never see a graceful shutdown).

Exit codes of odyn: the app's exit code; 107 when the app was killed by a signal; 108 when odyn
itself failed. If odyn fails after its status service is up, it does not vanish: it reports
`fatal` and stays up ("zombie") until its linger time is over, so the host can read the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from enclaver_rules.errors import EnclaverError
from enclaver_rules.link.status import Status
from enclaver_rules.link.transport import Handler, Transport
from enclaver_rules.ports import FILES_OUT_PORT, IMDS_ADDRESS, LOGS_PORT, STATUS_PORT
from odyn import api, connections, ingress, transparent
from odyn.bringup import app_environment, set_hostname
from odyn.connections import Connections
from odyn.console import Console
from odyn.dns import AddressBook
from odyn.egress import EgressProxy
from odyn.files_out import FilesOut
from odyn.logring import DEFAULT_SIZE, LogRing

if TYPE_CHECKING:
    from enclaver_rules.manifest import Manifest

EXIT_SIGNALED = 107
EXIT_FATAL = 108
DEFAULT_LINGER = 5.0  # seconds readers get to collect the final status and the log's end
DEFAULT_IMDS = f"http://{IMDS_ADDRESS}"
DEFAULT_FLUSH = 5.0  # seconds open ingress/egress connections get to deliver what the app left


def raise_open_files_limit() -> str | None:
    """Raise the soft limit on open files to the hard one: each proxied connection holds two
    descriptors, and the proxy's and ingress's connection limits assume more than the usual soft
    1024. Returns what was done, for the log, or None when nothing changed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return None
    return f"open files limit raised from {soft} to {hard}"


def no_bring_up() -> list[str]:
    """The bring-up of `--no-bootstrap` (and of tests): nothing to do."""
    return []


@dataclass
class Supervisor:
    transport: Transport
    ring_size: int = DEFAULT_SIZE
    linger: float = DEFAULT_LINGER
    flush: float = DEFAULT_FLUSH
    bring_up: Callable[[], list[str]] = no_bring_up  # runs once the status and log services are up
    confine: Callable[[], None] | None = None  # runs in the app's process just before exec (no bypass)
    set_hostname: bool = False  # to the manifest's name, when the kernel has none (bring-up)
    resolv_conf: str = transparent.RESOLV_CONF  # rewritten for transparent egress
    nsm: Callable[[], api.Attester | None] | None = None  # opens the NSM; called once, for `api:` or `kms_proxy:`
    imds: str = DEFAULT_IMDS  # the instance metadata service the KMS proxy gets credentials from (via egress)
    console: Console | None = None  # a copy of the log on odyn's stdout (off with --no-console)
    status: Status = field(default_factory=lambda: Status("starting"))
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ring: LogRing = field(init=False)
    _log_changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _app: subprocess.Popen[bytes] | None = None
    _app_status: int | None = None
    _exited: asyncio.Event = field(default_factory=asyncio.Event)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)  # status and logs
    _network: list[asyncio.AbstractServer] = field(default_factory=list)  # ingress, egress, KMS proxy, attestation API
    _datagrams: list[asyncio.DatagramTransport] = field(default_factory=list)  # transparent DNS
    _connections: Connections = field(default_factory=Connections)  # ingress, egress, KMS proxy, attestation API
    _readers: Connections = field(default_factory=Connections)  # of status and logs
    _delivered: set[asyncio.Task[None]] = field(default_factory=set)
    _nsm: api.Attester | None = None
    _stops: list[Callable[[], None]] = field(default_factory=list)  # the KMS proxy's worker threads
    _files_out: FilesOut | None = None  # the manifest's `outputs:`, on FILES_OUT_PORT

    def __post_init__(self) -> None:
        self._ring = LogRing(self.ring_size)

    # -- status ---------------------------------------------------------------------------------

    async def set_status(self, status: Status) -> None:
        async with self._changed:
            self.status = status
            self._changed.notify_all()

    async def _serve_status(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent: Status | None = None
        try:
            while True:
                async with self._changed:
                    while self.status is sent:
                        await self._changed.wait()
                    sent = self.status
                writer.write(sent.line())
                await writer.drain()
                if sent.final:
                    writer.write_eof()
                    await writer.drain()
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    # -- logs -----------------------------------------------------------------------------------

    async def log(self, data: bytes) -> None:
        if self.console is not None:
            self.console.write(data)  # bounded: drops (with a marker) rather than wait for stdout
        async with self._log_changed:
            self._ring.append(data)
            self._log_changed.notify_all()

    def _log_line(self, line: str) -> None:
        """The sink of odyn's network services (`connections.set_log`): their lines (a connection
        limit reached, a broken chunked body) go into the log ring the host reads, not only to the
        enclave's console. Synchronous callers, so the append is scheduled, and the task kept."""
        task = asyncio.get_running_loop().create_task(self.log(f"{line.rstrip()}\n".encode()))
        self._delivered.add(task)
        task.add_done_callback(self._delivered.discard)

    async def _serve_logs(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        position = self._ring.reader()
        try:
            while True:
                async with self._log_changed:
                    data, position, end = self._ring.read(position)
                    while not data and not end:
                        await self._log_changed.wait()
                        data, position, end = self._ring.read(position)
                if data:
                    writer.write(data)
                    await writer.drain()
                if end:
                    writer.write_eof()  # everything the app wrote was sent: tell the reader
                    await writer.drain()
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def _pump(self, stream: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(stream, "rb"))
        try:
            while chunk := await reader.read(1 << 16):
                await self.log(chunk)
        finally:
            transport.close()

    # -- the app --------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Reap every child that has exited (PID 1 inherits orphans); note the app's status."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self._app is not None and pid == self._app.pid:
                self._app_status = status
                self._app.returncode = os.waitstatus_to_exitcode(status)
                self._exited.set()

    def _forward(self, signum: int) -> None:
        if self._app is not None and self._app.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._app.pid, signum)

    async def start_network(self, config: str | None, env: dict[str, str]) -> dict[str, str]:
        """Egress proxy, ingress listeners, the KMS proxy and the attestation API from the manifest at `config` (loaded
        only now, with the status service up, so a broken manifest is reported); returns the app's
        environment."""
        env = dict(env)
        if config is None:
            return env
        connections.set_log(self._log_line)
        raised = raise_open_files_limit()
        if raised:
            await self.log(f"odyn: {raised}\n".encode())
        from enclaver_rules.manifest import load_manifest

        manifest, _ = load_manifest(config)
        if self.set_hostname and set_hostname(manifest.name):
            await self.log(f"odyn: hostname set to {manifest.name}\n".encode())
        if manifest.outputs:
            self._files_out = FilesOut(manifest.outputs)
            self._servers.append(await self.transport.listen(FILES_OUT_PORT, self._readers.track(self._files_out.serve)))
            await self.log(f"odyn: files out on vsock {FILES_OUT_PORT}: {', '.join(manifest.outputs)}\n".encode())
        track = self._connections.track
        if manifest.egress.enabled:
            policy = manifest.egress.policy()
            book = AddressBook(transparent.NETWORK) if manifest.egress.transparent else None
            proxy = EgressProxy(policy, self.transport, book=book)
            self._network.append(await asyncio.start_server(track(proxy.handle), "127.0.0.1",
                                                            manifest.egress.proxy_port))
            if book is not None:
                self._datagrams.append(await transparent.start_dns(policy, book))
                tool = transparent.install_redirect(manifest.egress.proxy_port)
                transparent.point_resolver_here(self.resolv_conf)
                await self.log(f"odyn: transparent egress: DNS on 127.0.0.1:53, TCP to {transparent.NETWORK} "
                               f"redirected by {tool}, {self.resolv_conf} points here\n".encode())
            url = f"http://127.0.0.1:{manifest.egress.proxy_port}/"
            env.update({"http_proxy": url, "https_proxy": url, "HTTP_PROXY": url, "HTTPS_PROXY": url,
                        "no_proxy": "localhost,127.0.0.1", "NO_PROXY": "localhost,127.0.0.1"})
        for item in manifest.ingress:
            self._network.append(await ingress.serve(self.transport, item.listen_port, track))
        if manifest.kms_proxy is not None:
            env.update(await self._start_kms_proxy(manifest, track))
        if manifest.api is not None:
            port = manifest.api.listen_port
            attester = self._attester(f"the attestation API (api.listen_port {port})")
            self._network.append(await api.serve(api.AttestationApi(attester), port, track))
            await self.log(f"odyn: attestation API on 127.0.0.1:{port}\n".encode())
        return env

    async def _start_kms_proxy(self, manifest: Manifest, track: Callable[[Handler], Handler]) -> dict[str, str]:
        """The KMS proxy on 127.0.0.1:kms_proxy.listen_port; returns the app's variables that point
        AWS SDKs at it. It reaches IMDS and KMS only through the egress proxy, and attests with the
        NSM: without either odyn fails (fatal), as upstream does without egress."""
        assert manifest.kms_proxy is not None
        port = manifest.kms_proxy.listen_port
        if not manifest.egress.enabled:
            raise EnclaverError("KMS proxy is configured but egress is not. Configure egress allow policy to access "
                                f"the IMDS at {IMDS_ADDRESS} and the AWS KMS endpoint")  # upstream's words
        attester = self._attester(f"the KMS proxy (kms_proxy.listen_port {port})")
        from enclaver_rules.kms.credentials import ImdsCredentials
        from odyn import kms_proxy  # botocore and cryptography load only for enclaves that use the proxy

        egress = ("127.0.0.1", manifest.egress.proxy_port)
        proxy = kms_proxy.KmsProxy(attester, ImdsCredentials(self.imds, proxy=egress), manifest.kms_proxy.endpoint,
                                   egress)
        proxy.start()  # the first recipient key is made in a thread while the app starts
        self._network.append(await kms_proxy.serve(proxy, port, track))
        self._stops.append(proxy.close)
        url = f"http://127.0.0.1:{port}"
        await self.log(f"odyn: KMS proxy on {url} (AWS_ENDPOINT_URL_KMS, AWS_KMS_ENDPOINT), credentials from "
                       f"{self.imds} through egress\n".encode())
        return {"AWS_KMS_ENDPOINT": url, "AWS_ENDPOINT_URL_KMS": url}

    def _attester(self, what: str) -> api.Attester:
        """The NSM, opened once, for the attestation API and the KMS proxy. Without one odyn fails
        (fatal) rather than serve what can only answer errors: an app that asked for attestation
        must not run unattested."""
        if self._nsm is not None:
            return self._nsm
        why = "odyn was started without an NSM client"
        if self.nsm is not None:
            try:
                found = self.nsm()
            except OSError as e:
                why = str(e)
            else:
                if found is not None:
                    self._nsm = found
                    return found
                why = "there is no /dev/nsm (outside an enclave, point odyn at a simulated NSM: --nsm unix:PATH)"
        raise EnclaverError(f"the manifest turns on {what} but no NSM is available: {why}")

    async def run(self, argv: list[str], env: dict[str, str], config: str | None = None) -> int:
        loop = asyncio.get_running_loop()
        try:
            self._servers.append(await self.transport.listen(STATUS_PORT, self._readers.track(self._serve_status)))
        except OSError as e:
            await self.log(f"odyn: cannot serve status: {e}\n".encode())
            return EXIT_FATAL  # nothing can report anything: fail at once
        try:
            self._servers.append(await self.transport.listen(LOGS_PORT, self._readers.track(self._serve_logs)))
            for done in self.bring_up():
                await self.log(f"odyn: {done}\n".encode())
            env = await self.start_network(config, app_environment(env))
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._forward, signum)
            read_end, write_end = os.pipe()
            try:
                self._app = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=write_end,
                                             stderr=write_end, start_new_session=True, close_fds=True,
                                             preexec_fn=self.confine)
            finally:
                os.close(write_end)
            pump = asyncio.create_task(self._pump(read_end), name="odyn-log-pump")
            await self.set_status(Status("running"))
            self._reap()  # the app may have exited before the handler was installed
            await self._exited.wait()
            await pump  # everything the app wrote is in the ring
            await self._flush()
        except EnclaverError as e:
            return await self._fatal(str(e))
        except subprocess.SubprocessError as e:  # preexec (the sandbox) failed: the app never ran
            return await self._fatal(f"cannot start the app confined: {e}")
        except (OSError, ValueError) as e:
            return await self._fatal(f"{type(e).__name__}: {e}")
        assert self._app_status is not None
        if os.WIFSIGNALED(self._app_status):
            final, code = Status("signaled", signal=os.WTERMSIG(self._app_status)), EXIT_SIGNALED
        else:
            final = Status("exited", code=os.WEXITSTATUS(self._app_status))
            code = os.WEXITSTATUS(self._app_status)
        await self._finish(final)
        return code

    async def _flush(self) -> None:
        """Before the final status (after which the host may stop the enclave at once): accept no
        new connections, and give open ones `flush` seconds to deliver what the app left queued."""
        for server in self._network:
            server.close()
        finished, cut = await self._connections.drain(self.flush)
        if finished or cut:
            note = f", cut {cut} still open after {self.flush:g}s" if cut else ""
            await self.log(f"odyn: flushed {finished} open connection(s){note}\n".encode())

    async def _fatal(self, error: str) -> int:
        await self.log(f"odyn: fatal: {error}\n".encode())
        await self._finish(Status("fatal", error=error))
        return EXIT_FATAL

    async def _finish(self, final: Status) -> None:
        """Publish the final status, end the log, and give readers `linger` seconds to collect both;
        readers already connected then still get to the end (bounded by `flush`)."""
        connections.set_log(None)  # the ring closes now: later lines go to odyn's stderr
        async with self._log_changed:
            self._ring.close()
            self._log_changed.notify_all()
        if self.console is not None:
            await asyncio.to_thread(self.console.close, self.flush)
        if self._files_out is not None:
            self._files_out.close()  # readers get a last scan, then end-of-stream
        await self.set_status(final)
        await asyncio.sleep(self.linger)
        for server in self._servers + self._network:
            server.close()
        for stop in self._stops:
            stop()
        for datagram in self._datagrams:
            datagram.close()
        await self._readers.drain(self.flush)
