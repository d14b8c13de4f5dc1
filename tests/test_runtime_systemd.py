"""sd_notify over real AF_UNIX datagram sockets (a path and the abstract namespace), and the sample unit."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO
from enclaver_rules.runtime import systemd


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield path, sock


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"enclaver-test-notify-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield "@" + name, sock


def test_ready_status_stopping_and_mainpid_reach_a_path_socket(path_socket) -> None:
    address, sock = path_socket
    notifier = systemd.Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("app running in enclave i-1-enc2 (CID 16)")
    assert sock.recv(4096) == b"READY=1\nSTATUS=app running in enclave i-1-enc2 (CID 16)"
    assert notifier.status("draining")
    assert sock.recv(4096) == b"STATUS=draining"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.main_pid(4242)
    assert sock.recv(4096) == b"MAINPID=4242"


def test_abstract_namespace(abstract_socket) -> None:
    address, sock = abstract_socket
    assert systemd.notify({"NOTIFY_SOCKET": address}, READY=1)
    assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_a_no_op() -> None:
    notifier = systemd.Notifier.from_env({})
    assert not notifier.enabled and notifier.ready() is False and notifier.stopping() is False
    assert systemd.notify({"NOTIFY_SOCKET": ""}, READY=1) is False


def test_a_newline_cannot_smuggle_an_assignment(path_socket) -> None:
    address, sock = path_socket
    systemd.Notifier(address).status("app said\nMAINPID=1\x00")
    assert sock.recv(4096) == b"STATUS=app said MAINPID=1"


def test_long_status_is_cut(path_socket) -> None:
    address, sock = path_socket
    systemd.Notifier(address).status("x" * 5000)
    assert len(sock.recv(8192).decode()) == len("STATUS=") + systemd.MAX_STATUS


def test_a_dead_socket_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert systemd.Notifier(str(tmp_path / "gone")).ready() is False
    assert "could not notify systemd" in caplog.text
    assert systemd.Notifier("vsock:2:1234").ready() is False
    assert "not a Unix socket address" in caplog.text


def test_unset_removes_the_variable(path_socket, monkeypatch: pytest.MonkeyPatch) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = systemd.Notifier.from_env(unset=True)
    assert "NOTIFY_SOCKET" not in os.environ
    assert notifier.ready() and sock.recv(4096) == b"READY=1"


def test_mainpid_must_be_a_pid() -> None:
    with pytest.raises(ValueError):
        systemd.Notifier("/x").main_pid(0)


def test_the_sample_unit_file_is_the_constant_and_says_notify() -> None:
    unit = REPO / "examples" / "systemd" / "enclaver-run@.service"
    assert unit.read_text() == systemd.SAMPLE_UNIT
    lines = set(unit.read_text().splitlines())
    for needed in ("Type=notify", "KillSignal=SIGTERM", "TimeoutStopSec=60", "SuccessExitStatus=109",
                   "ExecStart=/usr/local/bin/enclaver run $ENCLAVER_ARGS ${ENCLAVER_IMAGE}"):
        assert needed in lines
    sections = [line for line in unit.read_text().splitlines() if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]
    service = unit.read_text().split("[Service]")[1].split("[Install]")[0]
    assert "StartLimit" not in service  # a [Unit] setting: systemd ignores it in [Service]
