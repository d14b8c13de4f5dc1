"""Real services for integration tests: a private dockerd and a distribution registry.

Each is started in its own temporary directory on a free 127.0.0.1 port or Unix socket and
stopped afterwards. If one cannot start, the test run fails with the service's own log: an
integration test is never skipped because its service is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 60.0


class ServiceError(RuntimeError):
    pass


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.path.exists(p)), None)
    if path is None:
        raise ServiceError(f"{binary} is not installed: `apt-get install -y {package}` (README command (b) does it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        if ready():
            return
        time.sleep(0.1)
    proc.kill()
    raise ServiceError(f"{what} did not become ready in {READY_TIMEOUT:.0f}s:\n{log.read_text(errors='replace')[-4000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Dockerd:
    host: str  # unix:///…/docker.sock, for DOCKER_HOST and the docker SDK
    root: Path


@dataclass(frozen=True)
class Registry:
    address: str  # 127.0.0.1:PORT
    root: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def start_dockerd(base: Path) -> Iterator[Dockerd]:
    binary = _need("dockerd", "docker.io")
    sock = base / "docker.sock"
    log = base / "dockerd.log"
    cmd = [binary, "--iptables=false", "--ip6tables=false", "--bridge=none", "--storage-driver=vfs",
           f"--data-root={base / 'data'}", f"--exec-root={base / 'exec'}", f"--pidfile={base / 'docker.pid'}",
           f"--host=unix://{sock}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            if not sock.exists():
                return False
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                    return b" 200 " in s.recv(64)
                except OSError:
                    return False
        _wait("dockerd", ready, proc, log)
        yield Dockerd(f"unix://{sock}", base)
    finally:
        _stop(proc)


def start_registry(base: Path, auth: str = "") -> Iterator[Registry]:
    """`auth` is an `auth:` block of distribution's configuration (htpasswd or token), or empty."""
    binary = _need("docker-registry", "docker-registry")
    port = free_port()
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: enclaver-tests\n"
        "log:\n  level: warn\n" + auth
    )
    log = base / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as r:
                    return bool(r.status == 200)
            except urllib.error.HTTPError as e:
                return e.code == 401  # up, and asking for credentials
            except OSError:
                return False
        _wait("docker-registry", ready, proc, log)
        yield Registry(f"127.0.0.1:{port}", base)
    finally:
        _stop(proc)


def preflight() -> int:
    """Start and stop each service once; used by .ci/run to fail loudly before the suite runs."""
    import sys
    import tempfile

    for name, start in (("dockerd", start_dockerd), ("docker-registry", start_registry)):
        with tempfile.TemporaryDirectory(prefix=f"enclaver-{name}-") as base:
            try:
                for service in start(Path(base)):
                    print(f"preflight: {name} is up ({service})")
            except ServiceError as e:
                print(f"preflight: {name} cannot start: {e}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(preflight())
