"""Requests through `enclaver run --simulate`'s ingress into the enclave, side by side with the same app reached directly.

    .venv/bin/python benchmarks/simulated_latency.py [--requests 300] [--file-mib 64] [--transfers 5] [--repeat 5]
    .venv/bin/python benchmarks/simulated_latency.py --quick      # smoke run: 40 requests, 4 MiB, 1 repeat

Setup, not timed: a temporary monorepo (this repository's dodo.py, a development blob set, one
enclave `bench`) whose app is the hello example's (Debian's static busybox, its page at /index.html)
plus /www/big.bin, FILE_MIB MiB of a fixed random pattern, served by `busybox httpd -f -p 8080 -h /www`
(hello's command without `-v`, so neither side logs a line per request); `doit odyn_image` and
`doit build:bench` build its enclave image and EIF; a private dockerd (tests/services.py: vfs, no
iptables, no bridge) in the temporary directory. Then, `--repeat` times, both sides are started fresh:

  simulated  the real CLI, `enclaver run --simulate -p 127.0.0.1:P:8080 cache/out/bench/latest`, in its
             own process: the enclave image in Docker with `--network none`, odyn as its entrypoint.
             client → TCP 127.0.0.1:P → the host side of `enclaver run` (asyncio) → Unix socket
             standing in for vsock (bind-mounted) → odyn's ingress in the container → TCP
             127.0.0.1:8080 in the container's own loopback → httpd
  direct     the same image (the one `enclaver run` loaded into the engine: same layers, same busybox,
             same files) as a plain container with `--network host`, entrypoint replaced by the app's
             own command listening on 127.0.0.1:Q instead of 8080 (the container is on the host's
             loopback, so 8080 may be taken); the same memory and CPU limits (the manifest's
             defaults), root as in the simulator.
             client → TCP 127.0.0.1:Q → httpd

So the ratio is what the two relays (the host side and odyn, both Python, one Unix-socket hop)
cost over a bare loopback connection to the same server program serving the same bytes (the last
hop, odyn → httpd, is loopback in the container's own namespace, the direct one the host's: both
plain loopback, not measured apart). The client is
this process, blocking sockets, TCP_NODELAY. It competes with httpd, enclaver run and odyn for the
machine's cores, as any client on the same host would.

Latency: `--requests` small GETs of /index.html per side (after a warm-up), HTTP/1.0 with
`Connection: close`, one new connection per request (busybox httpd has no keep-alive anyway),
timed from connect to the end of the response (EOF, which is when a client without keep-alive
has it); the two sides alternate request by request, so they share the machine's noise. Every
response is checked (status 200, Content-Length, body equal to the page). Throughput: `--transfers`
GETs of /www/big.bin per side and repeat, alternating, timed the same way; the receiver counts the
body and compares every byte with the pattern (memcmp speed), so a relay that drops, duplicates or
reorders bytes fails instead of looking fast. Also timed, as context: start-up, from starting the
process (`enclaver run`; `docker run` through the SDK for the direct side) to the first 200 (the
first simulated start also loads the enclave image into the engine).

Printed: p50/p99 latency per side (median over repeats), MiB/s (median and best), the ratios
simulated/direct (latency: > 1 is slower; throughput: < 1 is slower), the added ms at p50 and p99;
CPU seconds per GiB of the host side (`enclaver run`) and of odyn during the transfers; and peak
RSS: the `enclaver run` process tree (from wait4, as benchmarks/_measure.py measures, so its
children count too), odyn's and httpd's (VmHWM, read before the stop). odyn's static binary
is a chain of three processes (staticx's loader, PyInstaller's bootloader, the interpreter that runs
odyn): the interpreter's peak is odyn's, the loaders' peaks (unpacking) are printed apart, and the
chain's RSS after the transfers as well.

Everything is cleaned up on every way out, Ctrl-C and SIGTERM included: `enclaver run` is stopped
with SIGTERM (it removes its container; a stop must end with its exit code 109), the direct
container is removed, any container left with either label is removed, dockerd is stopped and the
temporary directory removed. Nothing here asserts a time: a benchmark, never part of the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _measure import (  # noqa: E402  (benchmarks/)
    CHUNK,
    PATTERN_LEN,
    Terminated,
    free_port,
    pattern,
    percentile,
    receive_checked,
    status_kib,
    terminate_cleanly,
    wait_usage,
)

from services import Dockerd, start_dockerd  # type: ignore[import-not-found]  # noqa: E402  (tests/)

PY = sys.executable
NAME = "bench"
APP_PORT = 8080
MEMORY_MB = 512  # the hello example's defaults
CPU_COUNT = 2
BUSYBOX = Path("/bin/busybox")
PAGE = b"<!doctype html><title>hello</title><p>Hello from an enclave.</p>\n"  # examples/images.py's
SIM_LABEL = "dev.enclaver.simulator"  # enclaver_rules.runtime.simulator.LABEL
DIRECT_LABEL = "dev.enclaver.bench.direct"
READY_TIMEOUT = 180.0  # a bound so a broken start fails the run instead of hanging it
STOP_TIMEOUT = 60.0
SIM, DIRECT = "simulated", "direct"
SIDES = (SIM, DIRECT)
HOST_RSS = "enclaver run (its process tree, wait4)"
ODYN_RSS = "odyn's interpreter (VmHWM)"
ODYN_NOW = "odyn's processes now (VmRSS, after the transfers)"
ODYN_LOADERS = "odyn's staticx and PyInstaller loaders (VmHWM, while unpacking)"
HTTPD_SIM_RSS = "httpd in the enclave (VmHWM)"
HTTPD_DIRECT_RSS = "httpd direct (VmHWM)"


def app_command(listen: str) -> tuple[str, ...]:
    """The app's command; the image has `8080`, the direct container `127.0.0.1:Q`."""
    return ("/bin/busybox", "httpd", "-f", "-p", listen, "-h", "/www")


def big_file(size: int) -> bytes:
    block = pattern()[:PATTERN_LEN]
    return (block * (size // PATTERN_LEN + 1))[:size]


# -- setup ----------------------------------------------------------------------------------------------


def make_monorepo(root: Path, file_mib: int) -> None:
    """dodo.py, cache/, blobs/ and services/NAME/ (enclaver.yaml and the app's OCI layout). In a child
    process: the big file and its layer are held in memory."""
    import shutil

    from enclaver_rules.eif.blobs import write_dev_blobs
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout  # type: ignore[import-not-found]  # tests/, as remote_cache.py does

    root.mkdir(parents=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")  # alone: no examples/, so its examples branch is skipped
    (root / "cache").mkdir()
    write_dev_blobs(root / "blobs", "x86_64")
    directory = root / "services" / NAME
    directory.mkdir(parents=True)
    make_layout(str(directory / "app"), "latest", [[
        Entry.file("bin/busybox", BUSYBOX.read_bytes(), 0o755), Entry.symlink("bin/sh", "busybox"),
        Entry.file("www/index.html", PAGE), Entry.file("www/big.bin", big_file(file_mib << 20)),
        Entry.dir("tmp", 0o1777)]], cmd=app_command(str(APP_PORT)))
    (directory / "enclaver.yaml").write_text(
        f"version: v1\nname: {NAME}\ntarget: example.test/{NAME}:release\nsources:\n  app: oci:app:latest\n"
        f"ingress:\n  - listen_port: {APP_PORT}\n"
        f"defaults:\n  cpu_count: {CPU_COUNT}\n  memory_mb: {MEMORY_MB}\nbuild:\n  blobs: ../../blobs\n")


def setup_step(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> float:
    """Run a setup command in its own session (Ctrl-C is ours to handle); its wall seconds. On any way
    out before it ends (Ctrl-C, SIGTERM) its whole process group is killed, so nothing keeps writing
    into the temporary directory; exits loudly if it fails."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if code != 0:
            out.seek(0)
            raise SystemExit(f"{' '.join(cmd[1:4])} failed ({code}):\n{out.read()[-4000:].decode(errors='replace')}")
    return time.perf_counter() - start


def doit(root: Path, *args: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENC_")}
    env["SOURCE_DATE_EPOCH"] = "1700000000"
    return setup_step([PY, "-m", "doit", *args], cwd=root, env=env)


# -- the client -------------------------------------------------------------------------------------------


class Broken(SystemExit):
    """A response that is not what the app serves: the run fails instead of looking fast."""


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()


def _head(sock: socket.socket, what: str) -> tuple[int, bytes]:
    """Read the response head; its Content-Length and whatever body bytes came with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise Broken(f"{what}: the connection ended inside the response head: {data[:200]!r}")
        data += chunk
        if len(data) > 65536:
            raise Broken(f"{what}: no end of the response head in 64 KiB")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.") or lines[0].split()[1:2] != [b"200"]:
        raise Broken(f"{what}: {lines[0]!r}")
    lengths = [line.split(b":", 1)[1].strip() for line in lines[1:] if line.lower().startswith(b"content-length:")]
    if len(lengths) != 1:
        raise Broken(f"{what}: {len(lengths)} Content-Length headers")
    return int(lengths[0]), rest


def get_page(port: int) -> float:
    """One small GET on a new connection: seconds from connect to EOF; the response checked."""
    start = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(_request("/index.html"))
        length, body = _head(sock, "GET /index.html")
        while chunk := sock.recv(65536):
            body += chunk
    elapsed = time.perf_counter() - start
    if length != len(PAGE) or body != PAGE:
        raise Broken(f"GET /index.html: Content-Length {length}, {len(body)} bytes, body {body[:100]!r}")
    return elapsed


def get_big(port: int, size: int, data: bytes) -> float:
    """GET /big.bin: seconds from connect to EOF; every byte compared with the pattern."""
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(_request("/big.bin"))
        length, first = _head(sock, "GET /big.bin")
        rest, ok = receive_checked(sock, data, buf, len(first))
        count, ok = len(first) + rest, ok and data.startswith(first)
    elapsed = time.perf_counter() - start
    if length != size or count != size or not ok:
        raise Broken(f"GET /big.bin: Content-Length {length}, got {count} of {size} bytes, "
                     f"content {'ok' if ok else 'WRONG'}")
    return elapsed


def wait_answering(port: int, alive: Callable[[], None], what: str) -> None:
    """Poll GET /index.html until it answers; `alive` raises if the side died."""
    start = time.perf_counter()
    while True:
        alive()
        try:
            get_page(port)
            return
        except (OSError, Broken):
            if time.perf_counter() - start > READY_TIMEOUT:
                raise SystemExit(f"{what} did not answer in {READY_TIMEOUT:.0f} s") from None
            time.sleep(0.05)


# -- processes: CPU, peak RSS -------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    return kids


def tree(pid: int) -> list[int]:
    found, todo = [pid], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def vm_kib(pids: list[int], what: str = "VmHWM") -> int:
    """The sum of `what` (VmHWM: peak RSS; VmRSS: RSS now) of these processes; those gone count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += status_kib(pid, what)
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system time of these processes (and of their reaped children)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, however it dies (enclaver run then
    removes its container)."""
    with contextlib.suppress(OSError, AttributeError, ImportError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def unmount_below(base: Path) -> None:
    """Unmount what a stopped dockerd leaves mounted under `base` (its exec root's `netns/default`, an nsfs
    bind mount), deepest first, so the temporary directory can be removed."""
    import ctypes

    prefix = str(base.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]  # \040 etc. are octal escapes
    libc = ctypes.CDLL(None, use_errno=True)
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        if libc.umount2(point.encode(), 2) != 0:  # MNT_DETACH
            print(f"cannot unmount {point}: {os.strerror(ctypes.get_errno())}", file=sys.stderr)


# -- one repeat: both sides up, measured, stopped -----------------------------------------------------------------


@dataclass
class Results:
    latency: dict[str, list[list[float]]] = field(default_factory=lambda: {s: [] for s in SIDES})  # per repeat
    mibps: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})
    startup: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})
    host_cpu_per_gib: list[float] = field(default_factory=list)
    odyn_cpu_per_gib: list[float] = field(default_factory=list)
    rss_kib: dict[str, int] = field(default_factory=dict)  # max over repeats
    stop_s: list[float] = field(default_factory=list)

    def peak(self, name: str, kib: int) -> None:
        self.rss_kib[name] = max(self.rss_kib.get(name, 0), kib)


class Bench:
    """The engine, the monorepo and what is running; `cleanup` ends all of it, whatever state it is in."""

    def __init__(self, base: Path, root: Path, dockerd: Dockerd) -> None:
        import docker

        self.base, self.root, self.dockerd = base, root, dockerd
        self.client = docker.DockerClient(base_url=dockerd.host, version="auto")
        self.enclaver: subprocess.Popen[bytes] | None = None
        self.direct: Any = None  # docker.models.containers.Container
        self.runs = 0

    # -- the simulated side --

    def start_simulated(self, port: int) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENC_")}
        env.update(DOCKER_HOST=self.dockerd.host, ENC_CACHE_DIR=str(self.root / "cache"),
                   ENC_SIM_STATE=str(self.base / "sim-state"))
        self.runs += 1
        log = open(self.base / f"enclaver-run-{self.runs}.log", "wb")  # noqa: SIM115 (the child has it; closed below)
        with log:
            self.enclaver = subprocess.Popen(
                [PY, "-m", "enclaver_rules.cli", "run", "--simulate", f"cache/out/{NAME}/latest",
                 "-p", f"127.0.0.1:{port}:{APP_PORT}"], cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        return self.enclaver

    def enclaver_alive(self) -> None:
        if self.enclaver is not None and self.enclaver.poll() is not None:
            raise SystemExit(f"enclaver run exited with {self.enclaver.returncode}:\n{self.enclaver_log()}")

    def enclaver_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / f"enclaver-run-{self.runs}.log").read_text(errors="replace")[-3000:]
        return ""

    def sim_container(self) -> Any:
        found = self.client.containers.list(filters={"label": SIM_LABEL})
        if len(found) != 1:
            raise SystemExit(f"expected one simulator container, found {len(found)}")
        return found[0]

    def stop_simulated(self, results: Results | None) -> None:
        """SIGTERM; wait4 for its exit code and the tree's peak RSS (KiB); SIGKILL after STOP_TIMEOUT."""
        proc, self.enclaver = self.enclaver, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        start = time.perf_counter()
        usage = wait_usage(proc, time.monotonic() + STOP_TIMEOUT, 0.02)
        if usage is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SystemExit(f"enclaver run did not stop in {STOP_TIMEOUT:.0f} s:\n{self.enclaver_log()}")
        if results is not None:
            results.stop_s.append(time.perf_counter() - start)
            results.peak(HOST_RSS, usage.peak_rss_kib)
            if proc.returncode != 109:  # EXIT_INTERRUPTED: stopped by a signal, final status drained
                raise SystemExit(f"enclaver run ended with {proc.returncode}, not 109:\n{self.enclaver_log()}")

    # -- the direct side --

    def start_direct(self, image: str, port: int) -> Any:
        self.direct = self.client.containers.run(
            image, entrypoint=list(app_command(f"127.0.0.1:{port}")), command=[], network_mode="host",
            mem_limit=f"{MEMORY_MB}m", nano_cpus=int(CPU_COUNT * 1e9), user="0", labels={DIRECT_LABEL: NAME},
            detach=True)
        return self.direct

    def direct_alive(self) -> None:
        if self.direct is not None:
            self.direct.reload()
            if self.direct.status not in ("created", "running"):
                raise SystemExit(f"the direct container is {self.direct.status}: "
                                 f"{self.direct.logs()[-2000:].decode(errors='replace')}")

    def stop_direct(self) -> None:
        container, self.direct = self.direct, None
        if container is not None:
            container.remove(force=True)

    def cleanup(self) -> None:
        try:
            self.stop_simulated(None)
        finally:
            try:
                self.stop_direct()
            finally:
                for label in (SIM_LABEL, DIRECT_LABEL):  # whatever a failure left behind
                    for container in self.client.containers.list(all=True, filters={"label": label}):
                        with contextlib.suppress(Exception):
                            container.remove(force=True)
                self.client.close()


def one_repeat(bench: Bench, r: int, args: argparse.Namespace, data: bytes, results: Results) -> None:
    size = args.file_mib << 20
    sim_port, direct_port = free_port(), free_port()
    start = time.perf_counter()
    bench.start_simulated(sim_port)
    wait_answering(sim_port, bench.enclaver_alive, "enclaver run --simulate")
    results.startup[SIM].append(time.perf_counter() - start)
    container = bench.sim_container()
    container.reload()
    image = container.attrs["Image"]  # the enclave image enclaver run loaded: the direct side runs it too
    odyn_pid = int(container.attrs["State"]["Pid"])
    start = time.perf_counter()
    direct = bench.start_direct(image, direct_port)
    wait_answering(direct_port, bench.direct_alive, "the direct container")
    results.startup[DIRECT].append(time.perf_counter() - start)
    direct.reload()
    httpd_direct = int(direct.attrs["State"]["Pid"])
    ports = {SIM: sim_port, DIRECT: direct_port}
    alive = {SIM: bench.enclaver_alive, DIRECT: bench.direct_alive}
    enclaver_pid = bench.enclaver.pid if bench.enclaver else 0

    def odyn_pids() -> list[int]:
        """The container's first process and its descendants that are not the app (busybox), parents first."""
        chain, todo = [], [odyn_pid]
        while todo:
            pid = todo.pop(0)
            chain.append(pid)
            todo += [k for k in _children(pid) if comm(k) != "busybox"]
        return chain

    # latency: alternating request by request, the first side changing with the repeat
    samples: dict[str, list[float]] = {s: [] for s in SIDES}
    for i in range(args.warmup + args.requests):
        for side in (SIDES if (i + r) % 2 == 0 else SIDES[::-1]):
            elapsed = get_page(ports[side])
            if i >= args.warmup:
                samples[side].append(elapsed)
    for side in SIDES:
        results.latency[side].append(samples[side])
        alive[side]()

    # throughput: alternating transfer by transfer
    for i in range(args.transfers):
        for side in (SIDES if (i + r) % 2 == 0 else SIDES[::-1]):
            if side == SIM:
                before_host, before_odyn = cpu_seconds([enclaver_pid]), cpu_seconds(odyn_pids())
            elapsed = get_big(ports[side], size, data)
            if side == SIM:
                gib = size / (1 << 30)
                results.host_cpu_per_gib.append((cpu_seconds([enclaver_pid]) - before_host) / gib)
                results.odyn_cpu_per_gib.append((cpu_seconds(odyn_pids()) - before_odyn) / gib)
            results.mibps[side].append(args.file_mib / elapsed)
    for side in SIDES:
        alive[side]()

    # odyn's static binary is a chain: staticx's loader unpacks (its peak is that), PyInstaller's bootloader
    # unpacks again, the interpreter (the last) runs odyn; each waits for its child
    chain = odyn_pids()
    results.peak(ODYN_RSS, vm_kib(chain[-1:]))
    results.peak(ODYN_LOADERS, vm_kib(chain[:-1]))
    results.peak(ODYN_NOW, vm_kib(chain, "VmRSS"))
    results.peak(HTTPD_SIM_RSS, vm_kib([p for p in tree(odyn_pid) if comm(p) == "busybox"]))
    results.peak(HTTPD_DIRECT_RSS, vm_kib(tree(httpd_direct)))
    bench.stop_direct()
    bench.stop_simulated(results)
    if bench.client.containers.list(all=True, filters={"label": SIM_LABEL}):
        raise SystemExit("enclaver run ended but its container is still there")


# -- the run -------------------------------------------------------------------------------------------------




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="small GETs per side and repeat (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="GETs per side before the timed ones (default 30)")
    parser.add_argument("--file-mib", type=int, default=64, help="size of the big file in MiB (default 64)")
    parser.add_argument("--transfers", type=int, default=5, help="big GETs per side and repeat (default 5)")
    parser.add_argument("--repeat", type=int, default=5, help="fresh starts of both sides (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 requests, 4 MiB, 2 transfers, 1 repeat")
    parser.add_argument("--make-monorepo", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup, args.file_mib, args.transfers, args.repeat = 40, 5, 4, 2, 1
    if args.make_monorepo:
        make_monorepo(Path(args.make_monorepo), args.file_mib)
        return 0
    if min(args.requests, args.file_mib, args.transfers, args.repeat) < 1 or args.warmup < 0:
        parser.error("--requests, --file-mib, --transfers and --repeat must be at least 1")
    if not BUSYBOX.is_file():
        raise SystemExit(f"{BUSYBOX} is missing: apt-get install -y busybox-static")

    data = pattern()
    results = Results()
    setup: dict[str, float] = {}
    with terminate_cleanly(), tempfile.TemporaryDirectory(prefix="enclaver-sim-bench-", dir="/tmp") as tmp:
        base = Path(tmp)
        root = base / "repo"
        print(f"making a monorepo with a {args.file_mib} MiB file in the app ...", file=sys.stderr)
        setup["monorepo"] = setup_step([PY, __file__, "--make-monorepo", str(root), "--file-mib", str(args.file_mib)])
        print("`doit odyn_image` (~15-60 s) and `doit build:bench` ...", file=sys.stderr)
        setup["odyn image"] = doit(root, "odyn_image")
        setup["build"] = doit(root, f"build:{NAME}")
        (base / "dockerd").mkdir()
        engine = start_dockerd(base / "dockerd")
        try:
            bench = Bench(base, root, next(engine))
            try:
                print(f"{args.repeat} × (start both, {args.warmup}+{args.requests} small GETs and {args.transfers} "
                      f"× {args.file_mib} MiB per side, stop) ...", file=sys.stderr)
                load = [os.getloadavg()[0]]
                for r in range(args.repeat):
                    one_repeat(bench, r, args, data, results)
            except (KeyboardInterrupt, Terminated):
                raise
            except BaseException:
                if log := bench.enclaver_log().strip():
                    print(f"--- enclaver run's log:\n{log}", file=sys.stderr)
                raise
            finally:
                bench.cleanup()
        finally:
            try:
                engine.close()  # stops dockerd (start_dockerd's finally)
            finally:
                unmount_below(base)
    load.append(os.getloadavg()[0])
    print_report(args, results, setup, load)
    return 0


def print_report(args: argparse.Namespace, results: Results, setup: dict[str, float], load: list[float]) -> None:
    ms = {side: (statistics.median(percentile(s, 0.50) for s in results.latency[side]) * 1e3,
                 statistics.median(percentile(s, 0.99) for s in results.latency[side]) * 1e3) for side in SIDES}
    print(f"simulated enclave vs the same app container reached directly; {args.repeat} repeats (both sides "
          f"started fresh each time), {os.cpu_count()} CPUs")
    print(f"latency: GET /index.html ({len(PAGE)} bytes), new connection each, HTTP/1.0, {args.requests} per side "
          f"and repeat after {args.warmup} warm-up, alternating; ms, median over repeats")
    print(f"  {'':12}{'p50':>9}{'p99':>9}")
    for side in SIDES:
        print(f"  {side:12}{ms[side][0]:9.3f}{ms[side][1]:9.3f}")
    print(f"  {'ratio':12}{ms[SIM][0] / ms[DIRECT][0]:8.2f}x{ms[SIM][1] / ms[DIRECT][1]:8.2f}x   simulated/direct")
    print(f"  {'added':12}{ms[SIM][0] - ms[DIRECT][0]:+9.3f}{ms[SIM][1] - ms[DIRECT][1]:+9.3f}   ms")

    med = {side: statistics.median(results.mibps[side]) for side in SIDES}
    best = {side: max(results.mibps[side]) for side in SIDES}
    print(f"throughput: GET /big.bin ({args.file_mib} MiB, every byte checked), {args.transfers} per side and repeat, "
          "alternating; MiB/s")
    print(f"  {'':12}{'median':>9}{'best':>9}")
    for side in SIDES:
        print(f"  {side:12}{med[side]:9.0f}{best[side]:9.0f}")
    print(f"  {'ratio':12}{med[SIM] / med[DIRECT]:8.2f}x{best[SIM] / best[DIRECT]:8.2f}x   simulated/direct")
    print(f"  relay CPU during the simulated transfers, s per GiB (median): host side (enclaver run) "
          f"{statistics.median(results.host_cpu_per_gib):.2f}, odyn {statistics.median(results.odyn_cpu_per_gib):.2f}"
          f"  ({1 / TICK / (args.file_mib / 1024):.2f} per clock tick)")

    print("start-up to the first 200, s, per repeat: simulated " + ", ".join(f"{x:.2f}" for x in results.startup[SIM])
          + " (the first loads the enclave image into the engine); direct "
          + ", ".join(f"{x:.2f}" for x in results.startup[DIRECT]))
    print("stop (SIGTERM to enclaver run's exit 109, container removed), s: "
          + ", ".join(f"{x:.2f}" for x in results.stop_s))
    order = (HOST_RSS, ODYN_RSS, ODYN_NOW, ODYN_LOADERS, HTTPD_SIM_RSS, HTTPD_DIRECT_RSS)
    print("peak RSS, MiB (max over repeats): " + ", ".join(f"{k} {results.rss_kib[k] / 1024:.0f}" for k in order
                                                            if k in results.rss_kib))
    print("load average (1 min) when the measurements start and end: " + ", ".join(f"{x:.2f}" for x in load)
          + " (the setup's and this run's own processes count too; much more than 2 means other work)")
    print("setup (not timed): " + ", ".join(f"{k} {v:.0f} s" for k, v in setup.items()))


if __name__ == "__main__":
    sys.exit(main())
