"""odyn's ingress and egress relays against socat on the same paths: bulk throughput and added latency.

    .venv/bin/python benchmarks/proxy_throughput.py [--mib 256] [--repeat 5] [--round-trips 2000] [--quick]

Every component is its own process, so the client (this process, blocking sockets) shares no event
loop with a relay: the "app" (sink / source / echo server on 127.0.0.1, threads), a real odyn
(`python -m odyn --no-bootstrap --transport unix:DIR -- sleep …`, manifest with one ingress port
and egress), the host side of egress (`HostEgress`, CID 2 on the same DIR), and the socat baselines.

  ingress   client → Unix socket DIR/16.P.sock → odyn → TCP 127.0.0.1:P (the app)
            socat:  UNIX-LISTEN:DIR/socat-ingress.sock → TCP:127.0.0.1:P
  egress    client → TCP proxy port, `CONNECT 127.0.0.1:Q` → odyn → DIR/2.17002.sock → host side → TCP Q
            socat:  TCP-LISTEN → UNIX-CONNECT:DIR/socat-egress.sock, UNIX-LISTEN:… → TCP:127.0.0.1:Q;
            the client sends the same CONNECT; socat passes it on (its PROXY: address is a CONNECT
            client, not a proxy) and the app answers it, so both paths pay the handshake round trip
  direct    client → TCP 127.0.0.1:P, no relay (the ceiling, and the latency reference)

Each socat is started for one connection (no `fork`) before the client connects, so that wait4
gives its CPU to the microsecond (its start-up, a few ms, is included: at 256 MiB about 0.01 s/GiB).

socat runs twice over: as it comes (`-b 8192`, its default copy size) and with `-b 262144`
(`--socat-buffer`), what odyn reads at a time (256 KiB). The goal is checked against both; the
second is the honest bar, the first one odyn clears by 1.5-3× whatever it does.

Throughput: `--mib` MiB upload (client → app) and download (app → client) per transfer; the timer
covers connect (and CONNECT) to the app's acknowledgement or end-of-stream. The
bytes are a fixed random pattern of odd length repeated, and the receiving end compares every byte
with it (memcmp speed) and counts them, so a relay that drops, duplicates or reorders cannot look
fast. Latency: one connection per path, a 64-byte echo round trip `--round-trips` times after a
warm-up; p50 and p99, and "added" = that path's percentile − the direct one's. Relay CPU: time on
CPU of the relay processes per GiB moved, steadier than wall time on a busy 2-core machine: odyn and
the host side from /proc/PID/task/*/schedstat (nanoseconds, every thread), socat from wait4's rusage
(microseconds). Peak RSS: odyn's VmHWM at the end, socat's largest ru_maxrss.

Each variant runs `--repeat` times, in an order that rotates from repeat to repeat; printed are
medians over the repeats (throughput: the best too). Goals (from the issue): odyn/socat throughput
≥ 0.8, p99 added ≤ 1 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import Terminated, percentile, terminate_cleanly  # noqa: E402  (benchmarks/)

PATTERN_LEN = (1 << 20) + 13  # odd, so no chunk size lines up with it
CHUNK = 1 << 20
ECHO_SIZE = 64
SETTLE = 0.05
WARMUP = 100
READY_TIMEOUT = 20.0
GOAL_RATIO = 0.8
GOAL_P99_ADDED_MS = 1.0
EGRESS_PORT = 17002  # enclaver_rules.ports.EGRESS_PORT; the host side listens on DIR/2.17002.sock
ENCLAVE_CID = 16


def pattern() -> bytes:
    """The stream's content, twice over: any window of up to PATTERN_LEN bytes is one slice of it."""
    block = random.Random(0x656E636C).randbytes(PATTERN_LEN)
    return block + block


# -- the app: a sink, a source and an echo server on one port (child process) ----------------------


def serve_app() -> int:
    """First byte of each connection: S (sink: read to EOF, check, answer "<count> <ok>"),
    O + 8-byte length (source: send that many bytes, then EOF), E (echo to EOF)."""
    data = pattern()
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(listener.getsockname()[1], flush=True)

    def sink(conn: socket.socket) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        count = offset = 0
        ok = True
        while n := conn.recv_into(buf):
            ok = ok and data.startswith(view[:n], offset)
            count += n
            offset = (offset + n) % PATTERN_LEN
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(children: Children, what: str, connect: Callable[[], socket.socket]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        children.check()
        try:
            connect().close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not come up in {READY_TIMEOUT:.0f} s") from None
            time.sleep(0.02)


# -- the client ---------------------------------------------------------------------------------------


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


def unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
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


def upload(connect: Connect, size: int, data: bytes) -> float:
    view = memoryview(data)
    start = time.perf_counter()
    with connect() as sock:
        sock.sendall(b"S")
        offset, left = 0, size
        while left:
            n = min(CHUNK, left)
            sock.sendall(view[offset:offset + n])
            offset = (offset + n) % PATTERN_LEN
            left -= n
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
    elapsed = time.perf_counter() - start
    count, ok = (int(x) for x in answer.split())
    if count != size or not ok:
        raise SystemExit(f"upload broken: the app got {count} of {size} bytes, content {'ok' if ok else 'WRONG'}")
    return elapsed


def download(connect: Connect, size: int, data: bytes) -> float:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    with connect() as sock:
        sock.sendall(b"O" + size.to_bytes(8, "big"))
        count = offset = 0
        ok = True
        while n := sock.recv_into(buf):
            ok = ok and data.startswith(view[:n], offset)
            count += n
            offset = (offset + n) % PATTERN_LEN
    elapsed = time.perf_counter() - start
    if count != size or not ok:
        raise SystemExit(f"download broken: got {count} of {size} bytes, content {'ok' if ok else 'WRONG'}")
    return elapsed


def round_trips(connect: Connect, count: int) -> list[float]:
    """Seconds per 64-byte echo round trip on one connection, after a warm-up."""
    message = bytes(range(ECHO_SIZE))
    samples = []
    with connect() as sock:
        sock.sendall(b"E")
        for i in range(WARMUP + count):
            start = time.perf_counter()
            sock.sendall(message)
            answer = recv_exact(sock, ECHO_SIZE)
            elapsed = time.perf_counter() - start
            if answer != message:
                raise SystemExit(f"echo broken: {answer!r}")
            if i >= WARMUP:
                samples.append(elapsed)
    return samples



# -- the run ------------------------------------------------------------------------------------------



@dataclass
class Route:
    connect: Connect
    relays: list[int] = field(default_factory=list)  # long-running relay processes (odyn, the host side)
    #: socat: one process per hop, started for each connection (no `fork`), so that wait4 gives its CPU
    #: to the microsecond; returns the processes, each listening already
    spawn: Callable[[], list[subprocess.Popen[bytes]]] | None = None


def cpu_ns(pids: list[int]) -> int:
    """Nanoseconds on CPU of these processes, every thread summed (/proc/PID/task/*/schedstat, first
    field: the scheduler's own clock, not clock ticks)."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    return total


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


@dataclass
class Reaped:
    cpu: float = 0.0  # seconds, user + system, from rusage (microseconds)
    peak_rss_kib: int = 0


def reap(procs: list[subprocess.Popen[bytes]], children: Children, timeout: float = 10.0) -> Reaped:
    """Wait for single-shot socats; their CPU and peak RSS from wait4."""
    out = Reaped()
    deadline = time.monotonic() + timeout
    for proc in procs:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"socat {proc.args!r} did not exit after its connection ended")
            time.sleep(0.001)
        children.forget(proc)
        out.cpu += usage.ru_utime + usage.ru_stime
        out.peak_rss_kib = max(out.peak_rss_kib, usage.ru_maxrss)
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


def start_everything(children: Children, base: Path, socat_buffer: int) -> tuple[dict[str, dict[str, Route]], int]:
    """Start the app, odyn and the host side; return path → variant → route, and odyn's pid."""
    app = children.start("app", [sys.executable, __file__, "--serve-app"], stdout=subprocess.PIPE)
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
    host = children.start("host-egress", [sys.executable, __file__, "--serve-host-egress", str(sockets)])
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


VARIANTS = ("direct", "socat", "socat-b", "odyn")
BASELINES = ("socat", "socat-b")
PATHS = ("ingress", "egress")
DIRECTIONS = {"upload": upload, "download": download}


def rotated(items: tuple[str, ...], by: int) -> list[str]:
    by %= len(items)
    return list(items[by:] + items[:by])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per bulk transfer (default 256)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of every variant (default 5)")
    parser.add_argument("--round-trips", type=int, default=2000, help="64-byte echoes per latency run (default 2000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 MiB, 200 round trips")
    parser.add_argument("--socat-buffer", type=int, metavar="BYTES", default=256 << 10,
                        help="-b of the second socat (default 262144, odyn's relay chunk); the first has socat's "
                             "default, 8192")
    parser.add_argument("--serve-app", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-host-egress", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_app:
        return serve_app()
    if args.serve_host_egress:
        return serve_host_egress(args.serve_host_egress)
    if args.quick:
        args.mib, args.round_trips = 32, 200
    if not any((Path(d) / "socat").exists() for d in os.environ.get("PATH", "/usr/bin").split(":")):
        raise SystemExit("socat is missing: apt-get install -y socat")

    size = args.mib << 20
    data = pattern()
    mibps: dict[tuple[str, str, str], list[float]] = {}
    cpu: dict[tuple[str, str, str], list[float]] = {}  # relay CPU seconds per GiB
    p50: dict[tuple[str, str], list[float]] = {}
    p99: dict[tuple[str, str], list[float]] = {}
    rss: dict[str, int] = {}  # peak RSS, KiB: odyn, the host side, socat (largest single-shot process)
    with terminate_cleanly(), tempfile.TemporaryDirectory(prefix="enclaver-proxy-bench-") as tmp:
        children = Children(Path(tmp))
        try:
            paths, odyn_pid = start_everything(children, Path(tmp), args.socat_buffer)
            print(f"{args.repeat} × ({len(PATHS)} paths × {len(DIRECTIONS)} directions × {len(VARIANTS)} variants "
                  f"of {args.mib} MiB, {args.round_trips} round trips each) ...", file=sys.stderr)
            for r in range(args.repeat):
                for path in rotated(PATHS, r):
                    for variant in rotated(VARIANTS, r):
                        route = paths[path][variant]
                        for direction in rotated(tuple(DIRECTIONS), r):
                            spawned = route.spawn() if route.spawn else []
                            before = cpu_ns(route.relays)
                            elapsed = DIRECTIONS[direction](route.connect, size, data)
                            time.sleep(SETTLE)  # the relay finishes its close
                            used = (cpu_ns(route.relays) - before) / 1e9
                            if spawned:
                                reaped = reap(spawned, children)
                                used += reaped.cpu
                                rss[variant] = max(rss.get(variant, 0), reaped.peak_rss_kib)
                            mibps.setdefault((path, direction, variant), []).append(args.mib / elapsed)
                            cpu.setdefault((path, direction, variant), []).append(used * 1024 / args.mib)
                        spawned = route.spawn() if route.spawn else []
                        samples = round_trips(route.connect, args.round_trips)
                        reap(spawned, children)
                        p50.setdefault((path, variant), []).append(percentile(samples, 0.50))
                        p99.setdefault((path, variant), []).append(percentile(samples, 0.99))
                children.check()
            rss["odyn"] = peak_rss_kib(odyn_pid)
        except (KeyboardInterrupt, Terminated):
            raise
        except BaseException:  # a child failed or a relay broke the bytes: its log says why
            for name, _ in children.procs:
                if tail := children.tail(name).strip():
                    print(f"--- {name}'s log:\n{tail}", file=sys.stderr)
            raise
        finally:
            children.stop()

    print_report(args, mibps, cpu, p50, p99, rss)
    return 0


def print_report(args: argparse.Namespace, mibps: dict[tuple[str, str, str], list[float]],
                 cpu: dict[tuple[str, str, str], list[float]], p50: dict[tuple[str, str], list[float]], p99: dict[tuple[str, str], list[float]], rss: dict[str, int]) -> None:
    med = {k: statistics.median(v) for k, v in mibps.items()}
    best = {k: max(v) for k, v in mibps.items()}
    label = {"direct": "direct", "socat": "socat", "socat-b": f"socat -b {args.socat_buffer >> 10}K", "odyn": "odyn"}
    print(f"throughput: {args.mib} MiB per transfer, {args.repeat} repeats in rotating order; MiB/s, median (best); "
          "ratios of medians")
    print(f"  {'':18}" + "".join(f"{label[v]:>17}" for v in VARIANTS) + "".join(f"{'odyn/' + label[b]:>19}"
                                                                             for b in BASELINES))
    for path in PATHS:
        for direction in DIRECTIONS:
            cells = "".join(f"{med[path, direction, v]:8.0f} ({best[path, direction, v]:5.0f}) " for v in VARIANTS)
            ratios = "".join(f"{med[path, direction, 'odyn'] / med[path, direction, b]:19.2f}" for b in BASELINES)
            print(f"  {path + ' ' + direction:18}{cells}{ratios}")
    print("  upload = client → app, download = app → client. Egress: both clients speak CONNECT (socat's is")
    print("  answered by the app; odyn's proxy and host side also check the policy).")
    print("peak RSS (MiB): " + ", ".join(f"{label[v]} {rss[v] / 1024:.1f}" for v in ("odyn", "socat", "socat-b")
                                        if v in rss) + "  (odyn: VmHWM over the whole run; socat: one process)")

    relays = VARIANTS[1:]
    print("relay CPU: seconds on CPU per GiB moved, summed over the relay processes of the path (egress: both "
          "hops; odyn: schedstat ns, socat: wait4 µs), median")
    print(f"  {'':18}" + "".join(f"{label[v]:>17}" for v in relays) + "".join(f"{'odyn/' + label[b]:>19}"
                                                                            for b in BASELINES))
    for path in PATHS:
        for direction in DIRECTIONS:
            m = {v: statistics.median(cpu[path, direction, v]) for v in relays}
            ratios = "".join(f"{m['odyn'] / m[b]:19.2f}" if m[b] else f"{'-':>19}" for b in BASELINES)
            print(f"  {path + ' ' + direction:18}" + "".join(f"{m[v]:17.2f}" for v in relays) + ratios)

    print(f"round trips: {ECHO_SIZE}-byte echo, {args.round_trips} per run on one connection; µs, p50 / p99, "
          "median over repeats; +added = path − direct")
    print(f"  {'':24}{'p50':>8}{'p99':>8}{'added p50':>12}{'added p99':>12}")
    us = {k: (statistics.median(p50[k]) * 1e6, statistics.median(p99[k]) * 1e6) for k in p50}
    for path in PATHS:
        d50, d99 = us[path, "direct"]
        for v in VARIANTS:
            v50, v99 = us[path, v]
            extra = f"{v50 - d50:+12.0f}{v99 - d99:+12.0f}" if v != "direct" else ""
            print(f"  {path + ' ' + label[v]:24}{v50:8.0f}{v99:8.0f}{extra}")

    print("goals:")
    for baseline in BASELINES:
        for path in PATHS:
            for direction in DIRECTIONS:
                ratio = med[path, direction, "odyn"] / med[path, direction, baseline]
                verdict = "ok" if ratio >= GOAL_RATIO else "MISS"
                print(f"  ratio {path} {direction} odyn/{label[baseline]}: {ratio:.2f}  (goal >= {GOAL_RATIO})  "
                      f"{verdict}")
    for path in PATHS:
        added = (us[path, "odyn"][1] - us[path, "direct"][1]) / 1000
        socat_added = (us[path, "socat"][1] - us[path, "direct"][1]) / 1000
        verdict = "ok" if added <= GOAL_P99_ADDED_MS else "MISS"
        print(f"  p99 added latency {path}: odyn {added:.3f} ms, socat {socat_added:.3f} ms  "
              f"(goal <= {GOAL_P99_ADDED_MS:g} ms)  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
