"""Transparent egress, for apps that know nothing of proxies (`egress.transparent: true`).

1. A DNS responder on 127.0.0.1:53 (UDP) answers a name the egress policy allows with a
   placeholder address from 127.100.0.0/16 and remembers which name it stands for; a denied name
   gets NXDOMAIN, so the app fails at lookup with a clear error instead of a hang.
2. A netfilter rule (nftables, else iptables) redirects every TCP connection to that range to
   odyn's egress port. odyn reads the original destination (SO_ORIGINAL_DST), turns the
   placeholder back into the name, checks the policy again and tunnels to the host side like a
   CONNECT, where the name is resolved and checked a third time.

Why 127.100.0.0/16: every Linux loopback already owns all of 127.0.0.0/8, so the placeholders
route with no address or route set-up and no tool beyond nft/iptables; an enclave has no other
interface. What it needs: `nft` or `iptables` in the image, a kernel with netfilter NAT (the Nitro
kernel's config has it; UNCONFIRMED for every blob version) and root, which odyn is. Literal IP
destinations have no route in an enclave, so apps that dial IPs still need the proxy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import socket
import struct
import subprocess
from typing import cast

from enclaver_rules.policy import EgressPolicy, PolicyError
from enclaver_rules.ports import TRANSPARENT_DNS_PORT
from odyn import dns

NETWORK = ipaddress.IPv4Network("127.100.0.0/16")
DNS_PORT = TRANSPARENT_DNS_PORT
TTL = 5  # seconds: short, so a name evicted from the book is asked for again soon
SO_ORIGINAL_DST = 80
RESOLV_CONF = "/etc/resolv.conf"


class DnsResponder(asyncio.DatagramProtocol):
    def __init__(self, policy: EgressPolicy, book: dns.AddressBook) -> None:
        self.policy, self.book = policy, book
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector datagram transport does not subclass DatagramTransport: no isinstance)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def allowed(self, name: str) -> bool:
        if not name:
            return False
        try:
            return self.policy.decide(name).allowed
        except PolicyError:
            return False

    def answer(self, packet: bytes) -> bytes | None:
        """The reply to one datagram (None: drop it). Pure apart from the address book."""
        try:
            query = dns.parse_query(packet)
        except dns.DnsError as e:
            return dns.answer_error(packet, e.rcode)
        question = query.question
        if question.qclass not in (dns.CLASS_IN, dns.CLASS_ANY):
            return dns.answer_error(packet, dns.REFUSED)
        if not self.allowed(question.name):
            return dns.answer_error(packet, dns.NXDOMAIN)
        if question.qtype in (dns.TYPE_A, dns.TYPE_ANY):
            return dns.answer_a(query, self.book.address_for(question.name), TTL)
        return dns.answer_empty(query)  # AAAA and the rest: none, so clients use the A record

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where a redirected connection was going; None when it came to us directly."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None  # no conntrack entry: not NATed
    port, address = struct.unpack("!2xH4s8x", raw)
    original = (socket.inet_ntoa(address), port)
    return None if original == sock.getsockname()[:2] else original


def nft_ruleset(port: int, network: ipaddress.IPv4Network = NETWORK) -> str:
    return ("table ip enclaver_transparent {\n"
            "  chain output {\n"
            "    type nat hook output priority -100; policy accept;\n"
            f"    ip daddr {network} meta l4proto tcp redirect to :{port}\n"
            "  }\n"
            "}\n")


def iptables_rule(port: int, network: ipaddress.IPv4Network = NETWORK) -> list[str]:
    return ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", str(network), "-j", "REDIRECT", "--to-ports", str(port)]


def install_redirect(port: int, network: ipaddress.IPv4Network = NETWORK) -> str:
    """Redirect TCP to the placeholder range to `port`; returns the tool used. OSError if none works."""
    errors = []
    if nft := shutil.which("nft"):
        result = subprocess.run([nft, "-f", "-"], input=nft_ruleset(port, network), capture_output=True, text=True)
        if result.returncode == 0:
            return "nftables"
        errors.append(f"nft: {result.stderr.strip()}")
    if iptables := shutil.which("iptables"):
        result = subprocess.run([iptables, *iptables_rule(port, network)], capture_output=True, text=True)
        if result.returncode == 0:
            return "iptables"
        errors.append(f"iptables: {result.stderr.strip()}")
    if not errors:
        errors.append("neither nft nor iptables is in the image (install nftables or iptables)")
    raise OSError(f"transparent egress cannot redirect TCP: {'; '.join(errors)}")


def point_resolver_here(path: str = RESOLV_CONF) -> None:
    """The app's resolver must ask us: glibc, musl and Go all read this file."""
    with open(path, "w", encoding="ascii") as f:
        f.write("# written by odyn: egress.transparent answers names the egress policy allows\n"
                "nameserver 127.0.0.1\noptions ndots:0\n")


async def start_dns(policy: EgressPolicy, book: dns.AddressBook, host: str = "127.0.0.1",
                    port: int = DNS_PORT) -> asyncio.DatagramTransport:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: DnsResponder(policy, book), local_addr=(host, port))
    return transport
