"""The host side of egress under attack by a hostile enclave: special destinations and DNS rebinding.

The enclave talks to the host side (`HostEgress`) directly here, over the Unix emulation of vsock, as
a tampered odyn would: only the host side's own checks stand between it and the parent. Origins are
real TCP listeners on the loopback, which is exactly what must stay out of reach; each counts the
connections it gets, so "refused" also means "never touched".
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import REPO
from enclaver_rules.link.frames import ConnectRequest, ConnectResult, FrameDecoder, decode_result, encode_request
from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.policy import EgressPolicy
from enclaver_rules.policy.egress import special_range
from enclaver_rules.ports import EGRESS_PORT
from enclaver_rules.runtime.egress_host import HostEgress, Limits, is_own_address

ENCLAVE_CID = 16


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Origin:
    """A TCP listener that counts connections and greets each with its name."""

    def __init__(self, name: str) -> None:
        self.name, self.hits = name, 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hits += 1
        writer.write(f"hello from {self.name}\n".encode())
        await writer.drain()
        writer.close()


async def ask(directory: Path, host: str, port: int) -> tuple[ConnectResult, bytes]:
    """Send one tunnel request as the enclave; the answer, and (when "Ok") what the origin sent."""
    reader, writer = await UnixTransport(directory, ENCLAVE_CID).connect(2, EGRESS_PORT)
    try:
        writer.write(encode_request(ConnectRequest(host, port)))
        decoder, document = FrameDecoder(), None
        while document is None:
            chunk = await asyncio.wait_for(reader.read(4096), 20)
            if not chunk:
                raise EOFError("the host side closed without answering")
            document = decoder.feed(chunk)
        result = decode_result(document)
        rest = decoder.rest + (await asyncio.wait_for(reader.read(), 20) if result.ok else b"")
        return result, rest
    finally:
        writer.close()


def host_side(tmp_path: Path, allow: list[str], deny: list[str] = (), resolves: dict[str, list[str]] | None = None,  # type: ignore[assignment]
              ) -> HostEgress:
    async def resolver(name: str, _port: int) -> list[str]:
        if resolves is None or name not in resolves:
            raise OSError(errno.ENOENT, f"{name}: no such name in the test's resolver")
        return resolves[name]

    return HostEgress(EgressPolicy.from_lists(allow, deny), UnixTransport(tmp_path, 2), resolver=resolver,
                      limits=Limits(connect=2.0))


async def loopback_origin(name: str, host: str = "127.0.0.1", port: int = 0) -> tuple[Origin, asyncio.AbstractServer, int]:
    origin = Origin(name)
    server = await asyncio.start_server(origin, host, port)
    return origin, server, server.sockets[0].getsockname()[1]


# --------------------------------------------------------------------------------------------
# special destinations asked for by address


SPECIAL_DESTINATIONS = ["0.0.0.0", "::", "127.0.0.1", "127.0.0.2", "::ffff:127.0.0.1", "::ffff:0.0.0.0", "::1",
                        "0.1.2.3", "169.254.169.254", "fd00:ec2::254", "fe80::1", "::7f00:1", "64:ff9b::7f00:1"]


@pytest.mark.parametrize("destination", SPECIAL_DESTINATIONS)
def test_everything_rules_do_not_reach_special_addresses(tmp_path: Path, destination: str) -> None:
    """`0.0.0.0/0` and `::/0` allow the internet, not the parent's loopback, 0.0.0.0 or the metadata."""
    async def main() -> None:
        origins = [await loopback_origin("v4")]
        port = origins[0][2]
        for extra in ("127.0.0.2",) + (("::1",) if _ipv6_loopback() else ()):
            origins.append(await loopback_origin(extra, extra, port))  # the same port on every loopback
        host = host_side(tmp_path, ["0.0.0.0/0", "::/0"])
        server = await host.serve()
        result, _ = await ask(tmp_path, destination, port)
        assert not result.ok and result.os_code == errno.EACCES, result
        assert "does not name it" in result.message and "denied by the egress policy on the host" in result.message
        assert sum(o.hits for o, _, _ in origins) == 0
        for _, s, _ in origins:
            s.close()
        server.close()

    asyncio.run(main())


@pytest.mark.parametrize(("rule", "destination"), [("127.0.0.1", "127.0.0.1"), ("127.0.0.0/8", "127.0.0.2"),
                                                   ("127.0.0.1", "::ffff:127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_a_rule_naming_the_address_reaches_it(tmp_path: Path, rule: str, destination: str) -> None:
    async def main() -> None:
        _origin, server_v4, port = await loopback_origin("loopback", "127.0.0.1")
        other = await loopback_origin("loopback 2", "127.0.0.2", port)
        host = host_side(tmp_path, [rule, "10.0.0.0/8"])
        server = await host.serve()
        result, data = await ask(tmp_path, destination, port)
        assert result.ok, result
        assert data.startswith(b"hello from loopback")
        for s in (server_v4, other[1], server):
            s.close()

    asyncio.run(main())


def test_the_host_keyword_needs_its_own_rule(tmp_path: Path) -> None:
    """`*` and `**` match the label `host`, but only the rule `host` itself lets the enclave reach the parent."""
    async def main() -> None:
        origin, origin_server, port = await loopback_origin("parent")
        for allow in (["*"], ["**"], ["**", "0.0.0.0/0"]):
            host = host_side(tmp_path, allow)
            server = await host.serve()
            result, _ = await ask(tmp_path, "host", port)
            assert not result.ok and result.os_code == errno.EACCES and "only the allow rule 'host'" in result.message
            server.close()
            await server.wait_closed()
        assert origin.hits == 0
        host = host_side(tmp_path, ["host"])
        server = await host.serve()
        result, data = await ask(tmp_path, "host", port)
        assert result.ok and data == b"hello from parent\n"
        server.close()
        origin_server.close()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# DNS rebinding: an allowed name that resolves to a special address


REBINDS = [["127.0.0.1"], ["::ffff:127.0.0.1"], ["0.0.0.0"], ["127.0.0.2"], ["169.254.169.254"], ["::1"],
           ["fd00:ec2::254"], ["fe80::1%lo"], ["127.0.0.1", "0.0.0.0", "::1"]]


@pytest.mark.parametrize("answer", REBINDS, ids=lambda a: ",".join(a))
def test_an_allowed_name_cannot_be_rebound_onto_the_parent(tmp_path: Path, answer: list[str]) -> None:
    async def main() -> None:
        origin, origin_server, port = await loopback_origin("parent")
        others = [await loopback_origin(a, a, port) for a in ("127.0.0.2",) + (("::1",) if _ipv6_loopback() else ())]
        host = host_side(tmp_path, ["**.example.com", "0.0.0.0/0", "::/0"], resolves={"api.example.com": answer})
        server = await host.serve()
        result, _ = await ask(tmp_path, "api.example.com", port)
        assert not result.ok and result.os_code == errno.EACCES, result
        assert "api.example.com resolves to" in result.message and "DNS can point any name there" in result.message
        assert origin.hits == 0 and all(o.hits == 0 for o, _, _ in others)
        for s in [origin_server, server, *(s for _, s, _ in others)]:
            s.close()

    asyncio.run(main())


@pytest.mark.parametrize("answer", [["127.0.0.1", "127.0.0.5"], ["127.0.0.5", "127.0.0.1"],
                                    ["::ffff:127.0.0.1", "0.0.0.0", "169.254.169.254", "::1", "127.0.0.5"]],
                         ids=lambda a: ",".join(a))
def test_a_name_with_good_and_bad_addresses_reaches_only_the_good(tmp_path: Path, answer: list[str]) -> None:
    """Every address of the answer is judged, not only the first: the bad ones are skipped, never tried.
    (127.0.0.5 plays an ordinary remote host, allowed by a rule naming it: the test has only loopback.)"""
    async def main() -> None:
        bad, bad_server, port = await loopback_origin("bad", "127.0.0.1")
        good, good_server, _ = await loopback_origin("good", "127.0.0.5", port)
        host = host_side(tmp_path, ["**.example.com", "127.0.0.5"], resolves={"mixed.example.com": answer})
        server = await host.serve()
        result, data = await ask(tmp_path, "mixed.example.com", port)
        assert result.ok and data == b"hello from good\n"
        assert bad.hits == 0 and good.hits == 1
        assert host.refused and "resolves to 127.0.0.1" in host.refused[-1]
        for s in (bad_server, good_server, server):
            s.close()

    asyncio.run(main())


def test_deny_rules_still_win_after_dns(tmp_path: Path) -> None:
    async def main() -> None:
        origin, origin_server, port = await loopback_origin("x", "127.0.0.5")
        host = host_side(tmp_path, ["**.example.com", "127.0.0.0/8"], ["127.0.0.5"],
                         resolves={"a.example.com": ["127.0.0.5"]})
        server = await host.serve()
        result, _ = await ask(tmp_path, "a.example.com", port)
        assert not result.ok and "denied by deny rule '127.0.0.5'" in result.message and origin.hits == 0
        origin_server.close()
        server.close()

    asyncio.run(main())


def test_a_huge_answer_of_bad_addresses_gets_a_clean_refusal(tmp_path: Path) -> None:
    """Thousands of refused addresses: the refusal stays one bounded frame (it used to overflow the
    handshake's 64 KiB frame and kill the handler)."""
    answer = [f"127.0.{i // 256}.{i % 256}" for i in range(1, 4000)]

    async def main() -> None:
        host = host_side(tmp_path, ["**.example.com"], resolves={"many.example.com": answer})
        server = await host.serve()
        result, _ = await ask(tmp_path, "many.example.com", 80)
        assert not result.ok and result.os_code == errno.EACCES and len(result.message) <= 2000
        assert "resolves to 3999 addresses" in result.message
        server.close()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# the pure check, against an answer of any shape


ADDRESSES = st.one_of(st.ip_addresses(), st.sampled_from([
    ipaddress.ip_address(a) for a in ("0.0.0.0", "::", "127.0.0.1", "::1", "169.254.169.254", "fd00:ec2::254",
                                      "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe", "8.8.8.8", "2001:db8::1")]))


@given(st.lists(ADDRESSES, max_size=8))
def test_vet_keeps_exactly_the_ordinary_addresses_in_order(answer: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
    """With rules that allow every address, what the host side may connect to is the answer minus its
    special addresses (mapped ones as IPv4), in the resolver's order, without repeats."""
    policy = EgressPolicy.from_lists(["**.example.com", "0.0.0.0/0", "::/0"])

    async def resolver(_name: str, _port: int) -> list[str]:
        return [str(a) for a in answer]

    host = HostEgress(policy, UnixTransport("/nonexistent", 2), resolver=resolver, own_address=lambda _a: False)
    usable, _ = asyncio.run(host.vet("a.example.com", 443))
    expected: list[str] = []
    for a in answer:
        plain = a.ipv4_mapped if a.version == 6 and a.ipv4_mapped else a
        if special_range(plain) is None and str(plain) not in expected:
            expected.append(str(plain))
    assert usable == expected


# --------------------------------------------------------------------------------------------
# the parent's own addresses (not loopback): in a network namespace of our own


def test_own_address_probe() -> None:
    assert is_own_address(ipaddress.ip_address("127.0.0.1"))
    assert not is_own_address(ipaddress.ip_address("192.0.2.77"))  # TEST-NET-1: never assigned here


OWN_SCENARIO = r'''
import asyncio, json, subprocess, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from pathlib import Path
from test_egress_special_addresses import ask, host_side, loopback_origin
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "addr", "add", "198.51.100.7/32", "dev", "lo"], check=True)
subprocess.run(["ip", "addr", "add", "2001:db8::7/128", "dev", "lo", "nodad"], check=True)

async def main():
    directory = Path(sys.argv[3])
    origin, origin_server, port = await loopback_origin("parent", "198.51.100.7")
    origin6 = await loopback_origin("parent6", "2001:db8::7", port)
    out = {}
    for label, allow in (("wide", ["198.51.100.0/24", "2001:db8::/32", "**.example.com"]),
                         ("named", ["198.51.100.7", "2001:db8::7", "**.example.com"])):
        host = host_side(directory, allow, resolves={"own.example.com": ["198.51.100.7"],
                                                     "own6.example.com": ["2001:db8::7"]})
        server = await host.serve()
        for dest in ("198.51.100.7", "2001:db8::7", "::ffff:198.51.100.7", "own.example.com", "own6.example.com"):
            result, data = await ask(directory, dest, port)
            out[f"{label} {dest}"] = [result.ok, result.message, data.decode()]
        server.close()
        await server.wait_closed()
    out["hits"] = origin.hits + origin6[0].hits
    print(json.dumps(out))

asyncio.run(main())
'''


def test_the_parents_own_addresses_need_a_rule_naming_them(tmp_path: Path) -> None:
    """In a namespace where 198.51.100.7 and 2001:db8::7 are the parent's own addresses: a CIDR rule
    around them does not reach them, by address or through an allowed name; a rule naming them does."""
    script = tmp_path / "scenario.py"
    script.write_text(OWN_SCENARIO)
    sockets = tmp_path / "s"
    sockets.mkdir()
    run = subprocess.run(["unshare", "--net", "--", sys.executable, str(script), str(REPO / "tests"), str(REPO),
                          str(sockets)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    for dest in ("198.51.100.7", "2001:db8::7", "::ffff:198.51.100.7", "own.example.com", "own6.example.com"):
        ok, message, _ = out[f"wide {dest}"]
        assert not ok and "an address of the parent instance itself" in message, (dest, message)
        ok, message, data = out[f"named {dest}"]
        assert ok and data.startswith("hello from parent"), (dest, message)
    assert out["hits"] == 5  # the five named ones only
