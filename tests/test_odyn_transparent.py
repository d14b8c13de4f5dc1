"""Transparent egress: the DNS answers (read back with dnspython) and a real run in network and
mount namespaces made here — an app that knows nothing of proxies reaches an allowed name through
odyn and the host side, a denied name does not resolve, and odyn checks redirected connections."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype

from conftest import REPO
from enclaver_rules.policy import EgressPolicy
from odyn import dns as odyn_dns
from odyn import transparent

POLICY = EgressPolicy.from_lists(["**.example.com", "host"], ["bad.example.com"])


def ask(responder: transparent.DnsResponder, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    reply = responder.answer(query.to_wire())
    assert reply is not None
    answer = dns.message.from_wire(reply)
    assert answer.id == query.id and query.is_response(answer)
    return answer


def test_allowed_names_get_stable_placeholders_and_denied_names_nxdomain() -> None:
    responder = transparent.DnsResponder(POLICY, odyn_dns.AddressBook(transparent.NETWORK))
    first = ask(responder, "api.example.com")
    [rrset] = first.answer
    address = ipaddress.IPv4Address(rrset[0].address)
    assert address in transparent.NETWORK and rrset.ttl == transparent.TTL
    assert ask(responder, "API.example.com.").answer[0][0].address == str(address)  # same name, same address
    assert responder.book.name_for(address) == "api.example.com"
    assert ask(responder, "bad.example.com").rcode() == dns.rcode.NXDOMAIN  # deny wins
    assert ask(responder, "evil.org").rcode() == dns.rcode.NXDOMAIN  # not allowed
    aaaa = ask(responder, "api.example.com", "AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer  # so clients fall back to A
    assert ask(responder, "host").answer[0][0].address != str(address)


def test_odd_queries_get_error_answers_not_silence() -> None:
    responder = transparent.DnsResponder(POLICY, odyn_dns.AddressBook(transparent.NETWORK))
    chaos = dns.message.make_query("api.example.com", "TXT", rdclass="CH")
    reply = responder.answer(chaos.to_wire())
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
    garbage = responder.answer(b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 20)  # a query, mangled question
    assert garbage is not None and dns.message.from_wire(garbage).rcode() == dns.rcode.FORMERR
    assert responder.answer(b"\x12\x34\x81\x80" + bytes(8)) is None  # a response: never answered (no loops)
    assert responder.answer(b"\x01") is None


def test_the_redirect_rules() -> None:
    assert "ip daddr 127.100.0.0/16 meta l4proto tcp redirect to :10000" in transparent.nft_ruleset(10000)
    assert transparent.iptables_rule(8080)[-2:] == ["--to-ports", "8080"]


APP = r"""
import errno, socket, sys
out = []
s = socket.create_connection(("api.example.com", int(sys.argv[1])), timeout=10)  # no proxy anywhere
s.sendall(b"ping")
s.shutdown(socket.SHUT_WR)
out.append("echo: " + s.recv(100).decode())
try:
    socket.getaddrinfo("evil.org", 443)
    out.append("evil.org: resolved")
except socket.gaierror as e:
    out.append(f"evil.org: {e.errno == socket.EAI_NONAME}")
try:
    socket.create_connection(("127.100.255.254", 443), timeout=10).recv(1)  # never handed out by the DNS
    out.append("unknown placeholder: connected")
except ConnectionResetError:
    out.append("unknown placeholder: refused")
print("\n".join(out), flush=True)
"""


def test_an_app_without_proxy_support_reaches_allowed_names_only(tmp_path: Path) -> None:
    from test_odyn_supervisor import ENCLAVE_CID, collect

    from enclaver_rules.link.transport import UnixTransport
    from enclaver_rules.runtime.egress_host import HostEgress

    config = tmp_path / "cfg"
    config.mkdir()
    (config / "enclaver.yaml").write_text("version: v1\nname: t\ntarget: t\nsources: {app: a}\n"
                                          "egress:\n  allow: ['**.example.com']\n  transparent: true\n")
    (tmp_path / "app.py").write_text(APP)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.1\n")  # what the image had

    async def main() -> tuple[int, list[dict[str, object]], bytes, list[str]]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read())
            await writer.drain()
            writer.close()

        origin = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]

        async def resolver(name: str, _port: int) -> list[str]:
            return ["127.0.0.1"] if name == "api.example.com" else []

        host = HostEgress(EgressPolicy.from_lists(["**.example.com", "127.0.0.1"]), UnixTransport(tmp_path, 2),
                          resolver=resolver)  # the test server is on loopback: a special address, named
        server = await host.serve()
        script = (f"mount --bind {resolv} /etc/resolv.conf && exec {sys.executable} -m odyn --config-dir {config}"
                  f" --transport unix:{tmp_path} --cid {ENCLAVE_CID} --linger 1 -- {sys.executable}"
                  f" {tmp_path}/app.py {port}")
        odyn = subprocess.Popen(["unshare", "--net", "--mount", "--", "sh", "-c", script], cwd=REPO)
        lines, logs = await collect(tmp_path)
        code = await asyncio.get_running_loop().run_in_executor(None, odyn.wait, 30)
        server.close()
        origin.close()
        return code, lines, logs, host.refused

    code, lines, logs, refused = asyncio.run(main())
    text = logs.decode()
    assert code == 0 and lines[-1] == {"status": "exited", "code": 0}, text
    assert "redirected by nftables" in text, text
    assert "echo: ping" in text and "evil.org: True" in text and "unknown placeholder: refused" in text, text
    assert resolv.read_text().startswith("# written by odyn")
    assert refused == []  # the enclave side asked only for what it was allowed


def test_the_live_responder_survives_garbage_and_keeps_answering() -> None:
    """Over a real UDP socket: random datagrams and mangled queries, then a good query still gets
    its answer (nothing crashed, nothing hangs)."""
    import random
    import socket

    async def main() -> bytes:
        book = odyn_dns.AddressBook(transparent.NETWORK)
        server = await transparent.start_dns(POLICY, book, port=0)
        port = server.get_extra_info("sockname")[1]
        rng = random.Random(7)
        good = dns.message.make_query("api.example.com", "A").to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setblocking(False)
            for i in range(500):
                if i % 2:
                    packet = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
                else:
                    mangled = bytearray(good)
                    mangled[rng.randrange(len(mangled))] = rng.randrange(256)
                    packet = bytes(mangled)
                client.sendto(packet, ("127.0.0.1", port))
            await asyncio.sleep(0.2)
            while True:  # drop the answers to the garbage
                try:
                    client.recv(4096)
                except BlockingIOError:
                    break
            client.sendto(good, ("127.0.0.1", port))
            loop = asyncio.get_running_loop()
            while True:  # a late answer to a mangled copy can carry the same ID: match the whole question
                answer = await asyncio.wait_for(loop.sock_recv(client, 4096), 5)
                if answer[:2] == good[:2] and answer[12:].startswith(good[12:]):
                    break
        server.close()
        return answer

    answer = dns.message.from_wire(asyncio.run(main()))
    assert answer.rcode() == dns.rcode.NOERROR and ipaddress.IPv4Address(answer.answer[0][0].address) in transparent.NETWORK
