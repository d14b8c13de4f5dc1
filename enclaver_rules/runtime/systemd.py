"""sd_notify for `enclaver run` under a `Type=notify` unit: READY=1 when the app runs, STOPPING=1 on
shutdown, STATUS=… on the way, MAINPID when another process is the service's main one.

The protocol (systemd's sd_notify(3), "Notes"): one datagram of newline-separated VAR=value lines,
sent over an AF_UNIX SOCK_DGRAM socket to the address in $NOTIFY_SOCKET; an address starting with
'@' is in the abstract namespace (the '@' becomes a NUL byte). Without $NOTIFY_SOCKET it is a no-op.
Written here in a few lines rather than taken from a library: python-systemd (systemd-python on
PyPI) binds libsystemd and needs its headers and a compiler to install, and `sdnotify` on PyPI had
its last release (0.3.2) in 2017.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("enclaver.systemd")

ENV = "NOTIFY_SOCKET"
MAX_STATUS = 1024  # a STATUS line is for `systemctl status`; more is noise


class Notifier:
    """Sends to the socket named when it was made; `enabled` is False (and every call a no-op)
    without one. Errors are logged and reported as False: a lost notification must not stop the run
    (systemd then times the start out, which names the problem)."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """From $NOTIFY_SOCKET; `unset` removes it from os.environ so children do not inherit it."""
        source = os.environ if env is None else env
        notifier = cls(source.get(ENV))
        if unset and env is None:
            os.environ.pop(ENV, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send VAR=value lines (upper-case names, as given). A newline in a value would start a
        new assignment, so values are flattened to one line."""
        if self.address is None:
            return False
        lines = []
        for name, value in fields.items():
            text = " ".join(str(value).split("\n")).replace("\x00", "")
            lines.append(f"{name.upper()}={text}")
        return self._send("\n".join(lines).encode())

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": _status(status)} if status else {}))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": _status(status)} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=_status(text))

    def main_pid(self, pid: int) -> bool:
        if pid <= 0:
            raise ValueError(f"MAINPID must be a process ID, got {pid}")
        return self.notify(MAINPID=pid)

    def _send(self, data: bytes) -> bool:
        assert self.address is not None
        if self.address.startswith("@"):
            target = "\0" + self.address[1:]
        elif self.address.startswith("/"):
            target = self.address
        else:  # systemd 254+ also takes vsock:CID:PORT, for VMs; nothing here runs systemd that way
            log.warning("$%s=%r is not a Unix socket address; systemd is not told", ENV, self.address)
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, target)
        except OSError as e:
            log.warning("could not notify systemd at %s: %s", self.address, e.strerror or e)
            return False
        return True


def _status(text: str) -> str:
    return text if len(text) <= MAX_STATUS else text[: MAX_STATUS - 1] + "…"


def notify(env: Mapping[str, str] | None = None, **fields: str | int) -> bool:
    """One notification to $NOTIFY_SOCKET (from `env`, default os.environ); False when there is none."""
    return Notifier.from_env(env).notify(**fields)


#: A sample unit, also at examples/systemd/enclaver-run@.service (a test keeps the two equal).
SAMPLE_UNIT = """\
# enclaver-run@.service: one enclave per instance, e.g. `systemctl enable --now enclaver-run@billing`.
# /etc/enclaver/<instance>.env sets ENCLAVER_IMAGE (the release image or EIF) and, optionally,
# ENCLAVER_ARGS (e.g. --cpu-count 2 --memory-mb 4096 -p 8443:8443).
[Unit]
Description=enclaver enclave %i
Requires=nitro-enclaves-allocator.service
After=nitro-enclaves-allocator.service network-online.target
Wants=network-online.target
# Five failed starts in ten minutes and systemd stops retrying (see `systemctl status`).
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
# enclaver run sends READY=1 when the app runs inside the enclave and STOPPING=1 when it shuts down.
Type=notify
NotifyAccess=main
EnvironmentFile=/etc/enclaver/%i.env
ExecStart=/usr/local/bin/enclaver run $ENCLAVER_ARGS ${ENCLAVER_IMAGE}
# SIGTERM: enclaver terminates the enclave and drains; 109 is its exit code for "stopped by a signal".
KillSignal=SIGTERM
KillMode=mixed
TimeoutStartSec=300
TimeoutStopSec=60
SuccessExitStatus=109
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""
