"""Bring-up: the decisions (pure), the NSM entropy request, the app's environment, and the real steps
in namespaces the tests make with unshare(1): loopback down, no hostname, /sys and /dev missing."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from conftest import REPO
from odyn import bringup, nsm


def test_only_missing_file_systems_are_mounted() -> None:
    present = {"/proc/self/stat", "/dev/null"}
    assert [m.target for m in bringup.missing_mounts(present.__contains__)] == ["/sys"]
    assert bringup.missing_mounts(lambda _: True) == []


def test_hostname_is_set_only_where_the_kernel_has_none() -> None:
    assert bringup.needs_hostname("(none)\n") and bringup.needs_hostname("")
    assert not bringup.needs_hostname("ip-10-0-0-1\n") and not bringup.needs_hostname("localhost")
    assert bringup.hostname_for("a" * 70 + "-") == "a" * 63
    assert bringup.hostname_for("no-fly-list") == "no-fly-list"


def test_entropy_request_is_a_rand_pool_info() -> None:
    request = bringup.entropy_request(b"\x01\x02\x03\x04\x05")
    assert struct.unpack_from("=ii", request) == (40, 5)
    assert request[8:] == b"\x01\x02\x03\x04\x05\0\0\0"


def test_entropy_is_credited_to_the_kernel() -> None:
    bringup.add_entropy(bytes(range(32)))  # root, as in CI and in the enclave


class FakeNsm:
    def __init__(self, answer: object, raw: bytes | None = None) -> None:
        self.raw = raw if raw is not None else cbor2.dumps(answer)
        self.requests: list[bytes] = []

    def request(self, body: bytes) -> bytes:
        self.requests.append(body)
        return self.raw


def test_get_random_speaks_the_nsm_api() -> None:
    device = FakeNsm({"GetRandom": {"random": b"\x42" * 256}})
    assert nsm.get_random(device) == b"\x42" * 256
    assert cbor2.loads(device.requests[0]) == "GetRandom"


@pytest.mark.parametrize("answer", [{"Error": "InternalError"}, {"GetRandom": {"random": b""}}, "GetRandom", 7])
def test_get_random_refuses_odd_answers(answer: object) -> None:
    with pytest.raises(nsm.NsmError, match="answered GetRandom"):
        nsm.get_random(FakeNsm(answer))
    with pytest.raises(nsm.NsmError, match="not CBOR"):
        nsm.get_random(FakeNsm(None, raw=b"\xff\xff"))


def test_the_app_does_not_see_the_loaders_variables() -> None:
    env = {"PATH": "/bin", "_PYI_ARCHIVE_FILE": "/sbin/odyn", "STATICX_PROG_PATH": "/sbin/odyn",
           "LD_LIBRARY_PATH": "/tmp/_MEIxyz:/opt/lib", "LD_LIBRARY_PATH_ORIG": "/opt/lib",
           "TMPDIR": "/var/lib/odyn", "ODYN_APP_TMPDIR": ""}
    assert bringup.app_environment(env) == {"PATH": "/bin", "LD_LIBRARY_PATH": "/opt/lib"}
    env = {"_PYI_ARCHIVE_FILE": "/sbin/odyn", "LD_LIBRARY_PATH": "/tmp/_MEIxyz", "TMPDIR": "/var/lib/odyn",
           "ODYN_APP_TMPDIR": "/scratch"}
    assert bringup.app_environment(env) == {"TMPDIR": "/scratch"}
    assert bringup.app_environment({"LD_LIBRARY_PATH": "/opt", "TMPDIR": "/x"}) == {"LD_LIBRARY_PATH": "/opt",
                                                                                   "TMPDIR": "/x"}


CHECK = r"""
import os, socket, sys
s = socket.create_server(("127.0.0.1", 0))
socket.create_connection(s.getsockname()).close()  # ENETUNREACH while loopback is down
print("hostname", socket.gethostname())
print("sys", os.path.exists("/sys/kernel"), "dev", os.path.exists("/dev/null"))
"""


def test_bring_up_in_a_fresh_network_uts_and_mount_namespace(tmp_path: Path) -> None:
    """What the Nitro init leaves undone (loopback down, hostname "(none)") and what a bare start
    lacks (/sys, /dev), made real in namespaces: odyn fixes each, and says so in its log."""
    from test_odyn_supervisor import collect

    config = tmp_path / "cfg"
    config.mkdir()
    (config / "enclaver.yaml").write_text("version: v1\nname: no-fly-list\ntarget: t\nsources: {app: a}\n")
    (tmp_path / "check.py").write_text(CHECK)
    script = ("echo '(none)' > /proc/sys/kernel/hostname && mount -t tmpfs none /sys && mount -t tmpfs none /dev"
              f" && exec {sys.executable} -m odyn --config-dir {config} --transport unix:{tmp_path} --cid 16"
              f" --linger 2 -- {sys.executable} {tmp_path}/check.py")
    odyn = subprocess.Popen(["unshare", "--net", "--uts", "--mount", "--", "sh", "-c", script], cwd=REPO)
    lines, logs = asyncio.run(collect(tmp_path))
    assert odyn.wait(30) == 0, logs
    assert lines[-1] == {"status": "exited", "code": 0}
    text = logs.decode()
    for done in ("mounted sysfs on /sys", "mounted devtmpfs on /dev", "brought loopback up",
                 "hostname set to no-fly-list", "hostname no-fly-list", "sys True dev True"):
        assert done in text, text
    assert "proc on /proc" not in text  # present, so left alone


def test_no_bootstrap_leaves_the_namespace_as_it_is(tmp_path: Path) -> None:
    script = (f"exec {sys.executable} -m odyn --no-bootstrap --transport unix:{tmp_path} --linger 0"
              f" -- {sys.executable} {tmp_path}/check.py")
    (tmp_path / "check.py").write_text(CHECK)
    result = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], cwd=REPO, timeout=60)
    assert result.returncode == 1  # the app could not connect: loopback stayed down
