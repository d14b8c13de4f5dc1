"""`enclaver imds serve` as a test fixture: a real process on a free port, stopped with SIGTERM.

    from imds_helpers import running_imds

    with running_imds(lifetime=60) as imds:
        ImdsCredentials(imds.url).get()            # or botocore's InstanceMetadataFetcher(base_url=imds.url)

The server picks its own port (`--port 0`) and says which on stdout, so parallel tests never race for one.
Leaving the block sends SIGTERM and checks the server stopped cleanly (exit 0).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import socketserver
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ROLE = "enclave-role"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass
class RunningImds:
    url: str
    port: int
    role: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    process: subprocess.Popen[str] = field(repr=False)


@contextmanager
def running_imds(*, role: str = ROLE, access_key_id: str = ACCESS_KEY_ID,
                 secret_access_key: str = SECRET_ACCESS_KEY, lifetime: int = 3600, region: str = "us-east-1",
                 extra: tuple[str, ...] = ()) -> Iterator[RunningImds]:
    command = [sys.executable, "-m", "enclaver_rules.cli", "imds", "serve", "--port", "0", "--role", role,
               "--identity", f"{access_key_id}:{secret_access_key}", "--lifetime", str(lifetime),
               "--region", region, *extra, "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENC_")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stopped = False
    try:
        facts = _ready(process)
        server = RunningImds(facts["url"], facts["port"], role, access_key_id, secret_access_key, process)
        _wait_accepting(server.url)
        yield server
        stopped = True
        process.send_signal(signal.SIGTERM)
        code = process.wait(STOP_TIMEOUT)
        assert code == 0, f"enclaver imds serve exited {code} on SIGTERM: {process.stderr.read() if process.stderr else ''}"
    finally:
        if not stopped and process.poll() is None:
            process.kill()
        process.wait(STOP_TIMEOUT)
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


def _ready(process: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON document the server prints once it listens (`--json`: indented, ending in a lone `}`,
    written and flushed at once, so after the first line the rest follows without waiting)."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        readable = selector.select(timeout=START_TIMEOUT)
    lines: list[str] = []
    while readable and (line := process.stdout.readline()):
        lines.append(line)
        if line.rstrip("\n") == "}":
            return json.loads("".join(lines))  # type: ignore[no-any-return]
    process.kill()
    error = process.stderr.read() if process.stderr else ""
    raise RuntimeError(f"enclaver imds serve did not get ready: {''.join(lines)}{error}")


def _wait_accepting(url: str) -> None:
    where = urllib.parse.urlsplit(url)
    assert where.hostname and where.port
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            socket.create_connection((where.hostname, where.port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class ForwardProxy(socketserver.ThreadingTCPServer):
    """A tiny HTTP forward proxy: absolute-form requests only, every one sent to `upstream` whatever its
    host (as odyn's egress proxy sends 169.254.169.254 to the instance). It records each request line and
    Host header."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream, self.seen = upstream, []  # type: list[tuple[str, str]]
        super().__init__(("127.0.0.1", 0), ProxyHandler)


class ProxyHandler(socketserver.StreamRequestHandler):
    server: ForwardProxy

    def handle(self) -> None:
        request_line = self.rfile.readline().decode().rstrip("\r\n")
        method, target, version = request_line.split(" ")
        headers = []
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            headers.append(line)
        host = next(h.split(b":", 1)[1].strip().decode() for h in headers if h.lower().startswith(b"host:"))
        self.server.seen.append((request_line, host))
        if not target.startswith("http://"):
            self.wfile.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        path = "/" + target.split("/", 3)[3]
        with socket.create_connection(self.server.upstream) as up:
            up.sendall(f"{method} {path} {version}\r\n".encode() + b"".join(
                h for h in headers if not h.lower().startswith(b"connection:")) + b"Connection: close\r\n\r\n")
            while chunk := up.recv(65536):
                self.wfile.write(chunk)
