"""The local KMS as a test fixture: `enclaver kms serve` in a subprocess, and boto3 clients for it.

`local_kms(state, identities, roots=…)` starts the real command on a free port (`--port 0`; the port is
read from its `ready` line), waits until the port accepts connections, yields a `RunningKms`, then
sends SIGTERM and checks the server exited 0. Tests talk to it with real SDK calls.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from conftest import REPO

REGION = "us-east-1"
ACCOUNT = "111122223333"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/KmsAdmin"
PARENT = f"arn:aws:iam::{ACCOUNT}:role/EnclaveParent"
OUTSIDER = "arn:aws:iam::444455556666:user/mallory"
#: access key id → (secret, principal ARN)
IDENTITIES: Mapping[str, tuple[str, str]] = {
    "AKIDADMIN": ("admin-secret/+x", ADMIN),
    "AKIDPARENT": ("parent-secret", PARENT),
    "AKIDOUTSIDER": ("outsider-secret", OUTSIDER),
}
START_TIMEOUT = 60.0  # a bound so a broken server fails the test instead of hanging it; never asserted


@dataclass
class RunningKms:
    endpoint: str
    identities: Mapping[str, tuple[str, str]]
    state: Path
    process: subprocess.Popen[bytes]
    ready_line: str
    stderr_path: Path
    clients: dict[tuple[str, bool], Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def client(self, access_key: str = "AKIDADMIN", *, validate: bool = True, secret: str | None = None,
               token: str | None = None, region: str = REGION) -> Any:
        """A boto3 KMS client signing as `access_key` (its configured secret unless `secret`);
        validate=False sends what botocore's client-side checks would stop, so the server's own
        validation is what answers."""
        return boto3.client(
            "kms", endpoint_url=self.endpoint, region_name=region, aws_access_key_id=access_key,
            aws_secret_access_key=secret if secret is not None else self.identities.get(access_key, ("x",))[0],
            aws_session_token=token,
            config=Config(parameter_validation=validate, retries={"max_attempts": 1}, connect_timeout=10,
                          read_timeout=60))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def command(state: Path, identities: Mapping[str, tuple[str, str]], roots: Sequence[Path] = (), *,
            aws_root: bool = True, port: int = 0, region: str = REGION, account: str = ACCOUNT) -> list[str]:
    argv = [sys.executable, "-m", "enclaver_rules.cli", "kms", "serve", "--state", str(state), "--port", str(port),
            "--region", region, "--account", account]
    for access_key, (secret, principal) in identities.items():
        argv += ["--identity", f"{access_key}:{secret}={principal}"]
    for root in roots:
        argv += ["--attestation-root", str(root)]
    if not aws_root:
        argv.append("--no-aws-root")
    return argv


@contextlib.contextmanager
def local_kms(state: Path, identities: Mapping[str, tuple[str, str]] = IDENTITIES, roots: Sequence[Path] = (), *,
              aws_root: bool = True, region: str = REGION, account: str = ACCOUNT) -> Iterator[RunningKms]:
    """`enclaver kms serve` on a free port until the block ends; then SIGTERM, and exit status 0 is checked."""
    stderr_path = state.parent / f"{state.name}.stderr"
    with open(stderr_path, "ab") as stderr:
        process = subprocess.Popen(command(state, identities, roots, aws_root=aws_root, region=region,
                                           account=account),
                                   stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
    try:
        line = _ready_line(process, stderr_path)
        endpoint = line.split()[1]
        running = RunningKms(endpoint, identities, state, process, line, stderr_path)
        _wait_accepting(running.port, process)
        yield running
    finally:
        ended = process.poll() is not None
        if not ended:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"the local KMS did not stop on SIGTERM: {stderr_path.read_text()}") from None
        finally:
            if process.stdout:
                process.stdout.close()
    assert ended or code == 0, f"the local KMS exited {code} on SIGTERM: {stderr_path.read_text()}"


def _ready_line(process: subprocess.Popen[bytes], stderr_path: Path) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT
    buffer = b""
    try:
        while b"\n" not in buffer:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the local KMS did not get ready (exit {process.poll()}): "
                                     f"{stderr_path.read_text()}")
            if selector.select(timeout=0.5):
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    process.wait(timeout=30)
                    continue
                buffer += chunk
    finally:
        selector.close()
    line = buffer.split(b"\n", 1)[0].decode()
    assert line.startswith("ready http://"), line
    return line


def _wait_accepting(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_serve(state: Path, identities: Mapping[str, tuple[str, str]] = IDENTITIES, *extra: str,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`enclaver kms serve` expected to fail at start: its exit status and output."""
    return subprocess.run(command(state, identities) + list(extra), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
