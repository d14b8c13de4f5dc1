"""The host side of egress: vet each tunnel request again, resolve names here, connect to what passed.

The enclave asked for (host, port). We do not trust that its proxy checked the policy: names are
checked against name rules; the name is resolved here, on the parent; every resolved address is
checked against the deny rules (deny wins, after DNS too); then we connect to a vetted address itself, never
re-resolving, so a DNS answer that changes between check and connect cannot redirect the
connection. `host` means the parent instance (127.0.0.1).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from enclaver_rules.policy import EgressPolicy, PolicyError, parse_destination
from enclaver_rules.ports import EGRESS_PORT
from odyn.egress_frame import ConnectResult, FrameDecoder, FrameError, decode_request, encode_result
from odyn.relay import splice
from odyn.transport import Transport

Resolver = Callable[[str, int], Awaitable[list[str]]]
CONNECT_TIMEOUT = 10.0


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(str(sockaddr[0]))
    return seen


@dataclass
class HostEgress:
    policy: EgressPolicy
    transport: Transport
    resolver: Resolver = system_resolver
    refused: list[str] = field(default_factory=list)  # reasons, for logs and tests

    async def vet(self, host: str, port: int) -> tuple[list[str], str]:
        """(addresses we may connect to, why not when there are none).

        An IP destination must pass the IP rules. A name must pass the name rules, and may then go
        to any address it resolves to that no deny rule covers (deny wins, also after DNS).
        """
        try:
            dest = parse_destination(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        except PolicyError as e:
            return [], e.message
        decision = self.policy.decide(dest)
        if not decision.allowed:
            return [], decision.reason
        if dest.address is not None:
            return [str(dest.address)], ""
        if dest.host == "host":
            candidates = ["127.0.0.1"]
        else:
            try:
                candidates = await self.resolver(dest.host, port)
            except OSError as e:
                return [], f"cannot resolve {dest.host}: {e}"
        usable, refused = [], []
        for address in candidates:
            ip = ipaddress.ip_address(address.split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            after_dns = self.policy.decide(str(ip))
            if after_dns.list_name == "deny":
                refused.append(f"{dest.host} resolves to {ip}, {after_dns.reason}")
            else:
                usable.append(str(ip))
        return usable, "; ".join(refused)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder, document = FrameDecoder(), None
        try:
            while document is None:
                chunk = await asyncio.wait_for(reader.read(4096), 30)
                if not chunk:
                    writer.close()
                    return
                document = decoder.feed(chunk)
            request = decode_request(document)
        except (TimeoutError, FrameError):
            writer.close()
            return
        addresses, why = await self.vet(request.host, request.port)
        if not addresses:
            self.refused.append(why)
            writer.write(encode_result(ConnectResult(False, errno.EACCES, f"denied by the egress policy on the host: {why}")))
            await writer.drain()
            writer.close()
            return
        last: OSError | None = None
        for address in addresses:
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(address, request.port), CONNECT_TIMEOUT)
                break
            except (TimeoutError, OSError) as e:
                last = e if isinstance(e, OSError) else OSError(errno.ETIMEDOUT, "connect timed out")
        else:
            assert last is not None
            writer.write(encode_result(ConnectResult(False, last.errno or 0, str(last))))
            await writer.drain()
            writer.close()
            return
        writer.write(encode_result(ConnectResult(True)))
        await splice((reader, writer), upstream, first_to_b=decoder.rest)

    async def serve(self) -> asyncio.AbstractServer:
        return await self.transport.listen(EGRESS_PORT, self.handle)
