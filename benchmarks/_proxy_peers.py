"""The processes benchmarks/proxy_throughput.py talks to, and their set-up: the app (sink, source,
echo), the host side of egress, a real odyn and the single-shot socats; starting them, waiting until
they listen, reaping the socats (wait4: CPU and peak RSS) and stopping everything. Apart from the
client and the report so that each file stays readable; the protocol is in proxy_throughput.py's
docstring."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _measure import CHUNK, PATTERN_LEN, Usage, free_port, pattern, receive_checked, unix, wait_usage
from _measure import wait_ready as _wait_ready

REPO = Path(__file__).resolve().parent.parent

READY_TIMEOUT = 20.0
EGRESS_PORT = 17002  # enclaver_rules.ports.EGRESS_PORT; the host side listens on DIR/2.17002.sock
ENCLAVE_CID = 16

# -- the app: a sink, a source and an echo server on one port (child process) ----------------------


def serve_app() -> int:
    """First byte of each connection: S (sink: read to EOF, check, answer "<count> <ok>"),
    O + 8-byte length (source: send that many bytes, then EOF), E (echo to EOF)."""
    data = pattern()
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(listener.getsockname()[1], flush=True)

    def sink(conn: socket.socket) -> None:
        count, ok = receive_checked(conn, data, bytearray(CHUNK))
        conn.sendall(f"{count} {int(ok)}\n".encode())

    def source(conn: socket.socket, size: int) -> None:
        view = memoryview(data)
        offset = 0
        while size:
            n = min(CHUNK, size)
            conn.sendall(view[offset:offset + n])
            offset = (offset + n) % PATTERN_LEN
            size -= n

    def echo(conn: socket.socket) -> None:
        while chunk := conn.recv(65536):
            conn.sendall(chunk)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                mode = conn.recv(1)
                if mode == b"C":  # the socat egress client's CONNECT, passed on by both socats: answer it
                    head = b"C"
                    while not head.endswith(b"\r\n\r\n"):
                        head += recv_exact(conn, 1)
                    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    mode = conn.recv(1)
                if mode == b"S":
                    sink(conn)
                elif mode == b"O":
                    size = int.from_bytes(recv_exact(conn, 8), "big")
                    source(conn, size)
                elif mode == b"E":
                    echo(conn)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # readiness probes and aborted runs

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def serve_host_egress(directory: str) -> int:
    """The host side of egress on DIR (CID 2), as `enclaver run` would start it (child process)."""
    import asyncio

    sys.path.insert(0, str(REPO))
    from enclaver_rules.link.transport import UnixTransport
    from enclaver_rules.policy import EgressPolicy
    from enclaver_rules.runtime.egress_host import HostEgress

    async def main() -> None:
        server = await HostEgress(EgressPolicy.from_lists(["127.0.0.1", "host"]), UnixTransport(directory, 2)).serve()
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    return 0


# -- child processes --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, however it dies (odyn forwards it)."""
    with contextlib.suppress(OSError, AttributeError, ImportError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
    return found


@dataclass
class Children:
    logs: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    oneshot: set[int] = field(default_factory=set)  # reaped by `reap` (wait4), not polled by `check`

    def start(self, name: str, cmd: list[str], stdout: int | None = None, oneshot: bool = False) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed below, once the child has it)
        with log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else log,
                                    stderr=log, start_new_session=True, preexec_fn=_die_with_parent, cwd=REPO)
        self.procs.append((name, proc))
        if oneshot:
            self.oneshot.add(proc.pid)
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        self.procs = [(n, p) for n, p in self.procs if p is not proc]
        self.oneshot.discard(proc.pid)

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.pid not in self.oneshot and proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        """SIGTERM to each child's process group (socat's forks, odyn, which passes it to its app),
        then SIGKILL to whatever is left, descendants included."""
        everyone: list[int] = []
        for _, proc in self.procs:
            everyone += _descendants(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for _, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in everyone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_ready(children: Children, what: str, connect: Callable[[], socket.socket]) -> None:
    _wait_ready(children.check, what, connect, READY_TIMEOUT)


# -- connecting (the client does it the same way) ---------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"end of stream after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def tcp(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def via_connect(proxy_port: int, target_port: int) -> socket.socket:
    """A tunnel through odyn's egress proxy; nothing follows the 200 until we send."""
    sock = tcp(proxy_port)
    sock.sendall(f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\nHost: 127.0.0.1:{target_port}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"the proxy closed the connection: {head!r}")
        head += byte
    if not head.startswith(b"HTTP/1.1 200"):
        sock.close()
        raise ConnectionError(f"the proxy refused: {head.decode(errors='replace').strip()}")
    return sock


Connect = Callable[[], socket.socket]


# -- the routes: odyn's and the socats' --------------------------------------------------------------


@dataclass
class Route:
    connect: Connect
    relays: list[int] = field(default_factory=list)  # long-running relay processes (odyn, the host side)
    #: socat: one process per hop, started for each connection (no `fork`), so that wait4 gives its CPU
    #: to the microsecond; returns the processes, each listening already
    spawn: Callable[[], list[subprocess.Popen[bytes]]] | None = None


def reap(procs: list[subprocess.Popen[bytes]], children: Children, timeout: float = 10.0) -> Usage:
    """Wait for single-shot socats; their CPU (summed) and peak RSS (the largest) from wait4."""
    out = Usage()
    deadline = time.monotonic() + timeout
    for proc in procs:
        usage = wait_usage(proc, deadline)
        if usage is None:
            raise SystemExit(f"socat {proc.args!r} did not exit after its connection ended")
        children.forget(proc)
        out.cpu += usage.cpu
        out.peak_rss_kib = max(out.peak_rss_kib, usage.peak_rss_kib)
    return out


def listening_tcp(port: int) -> bool:
    with open("/proc/net/tcp") as f:
        return any(int(cols[1].split(":")[1], 16) == port and cols[3] == "0A"
                   for cols in (line.split() for line in list(f)[1:]))


def listening_unix(path: Path) -> bool:
    """Bound is not enough (connect is refused until listen): /proc/net/unix flags __SO_ACCEPTCON."""
    with open("/proc/net/unix") as f:
        return any(len(cols) > 7 and cols[7] == str(path) and int(cols[3], 16) & 0x10000
                   for cols in (line.split() for line in list(f)[1:]))


def wait_listening(children: Children, what: str, ready: Callable[[], bool]) -> None:
    """Without connecting: a single-shot socat serves the first connection only."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        children.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up in {READY_TIMEOUT:.0f} s")
        time.sleep(0.001)


def socat_spawner(children: Children, base: Path, variant: str, flags: list[str], app_port: int,
                  path: str) -> Callable[[], list[subprocess.Popen[bytes]]]:
    def spawn() -> list[subprocess.Popen[bytes]]:
        into, mid = base / f"{variant}-ingress.sock", base / f"{variant}-egress.sock"
        for stale in (into, mid):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        if path == "ingress":
            proc = children.start(f"{variant}-ingress", ["socat", *flags, f"UNIX-LISTEN:{into}",
                                                          f"TCP:127.0.0.1:{app_port},nodelay"], oneshot=True)
            wait_listening(children, f"{variant} (ingress)", functools.partial(listening_unix, into))
            return [proc]
        host = children.start(f"{variant}-egress-host", ["socat", *flags, f"UNIX-LISTEN:{mid}",
                                                          f"TCP:127.0.0.1:{app_port},nodelay"], oneshot=True)
        enclave = children.start(f"{variant}-egress-enclave", ["socat", *flags, f"TCP-LISTEN:{SOCAT_EGRESS_PORT[variant]},"
                                 "bind=127.0.0.1,reuseaddr,nodelay", f"UNIX-CONNECT:{mid}"], oneshot=True)
        wait_listening(children, f"{variant} (egress, host side)", functools.partial(listening_unix, mid))
        wait_listening(children, f"{variant} (egress)", lambda: listening_tcp(SOCAT_EGRESS_PORT[variant]))
        return [host, enclave]

    return spawn


SOCAT_EGRESS_PORT: dict[str, int] = {}


def start_everything(children: Children, base: Path, socat_buffer: int,
                     script: str) -> tuple[dict[str, dict[str, Route]], int]:
    """Start the app, odyn and the host side; return path → variant → route, and odyn's pid. `script` is
    run with --serve-app and --serve-host-egress DIR for the first two (proxy_throughput.py)."""
    app = children.start("app", [sys.executable, script, "--serve-app"], stdout=subprocess.PIPE)
    assert app.stdout is not None
    line = app.stdout.readline()
    if not line:
        children.check()
    app_port = int(line)

    sockets, config = base / "vsock", base / "config"
    sockets.mkdir()
    config.mkdir()
    proxy_port = free_port()
    (config / "enclaver.yaml").write_text(
        f"version: v1\nname: bench\ntarget: t\nsources: {{app: a}}\n"
        f"ingress:\n  - listen_port: {app_port}\n"
        f"egress:\n  proxy_port: {proxy_port}\n  allow: [\"127.0.0.1\", host]\n")
    host = children.start("host-egress", [sys.executable, script, "--serve-host-egress", str(sockets)])
    odyn = children.start("odyn", [sys.executable, "-m", "odyn", "--no-bootstrap", "--config-dir", str(config), "--transport",
                            f"unix:{sockets}", "--cid", str(ENCLAVE_CID), "--linger", "0", "--", "sleep", "100000"])

    odyn_ingress = sockets / f"{ENCLAVE_CID}.{app_port}.sock"
    wait_ready(children, "the app", lambda: tcp(app_port))
    wait_ready(children, "the host side of egress", lambda: unix(sockets / f"2.{EGRESS_PORT}.sock"))
    wait_ready(children, "odyn's ingress", lambda: unix(odyn_ingress))
    wait_ready(children, "odyn's egress proxy", lambda: via_connect(proxy_port, app_port))
    direct = Route(functools.partial(tcp, app_port))
    paths = {
        "ingress": {"direct": direct, "odyn": Route(functools.partial(unix, odyn_ingress), [odyn.pid])},
        "egress": {"direct": direct, "odyn": Route(functools.partial(via_connect, proxy_port, app_port),
                                                   [odyn.pid, host.pid])},
    }
    for variant, flags in (("socat", []), ("socat-b", ["-b", str(socat_buffer)])):
        into, port = base / f"{variant}-ingress.sock", free_port()
        SOCAT_EGRESS_PORT[variant] = port
        paths["ingress"][variant] = Route(functools.partial(unix, into),
                                          spawn=socat_spawner(children, base, variant, flags, app_port, "ingress"))
        paths["egress"][variant] = Route(functools.partial(via_connect, port, app_port),  # the app answers CONNECT
                                         spawn=socat_spawner(children, base, variant, flags, app_port, "egress"))
    return paths, odyn.pid
