"""The host side of egress: vet each tunnel request again, resolve names here, connect to what passed.

The enclave asked for (host, port), and its app is a hostile client: we do not trust that its proxy
checked the policy, nor that it talks at a reasonable pace.

* Policy. An IP destination must pass the IP rules; a name must pass the name rules, is resolved
  here, on the parent, and **every** address it resolves to is judged before any connection
  (`EgressPolicy.decide_resolved`): deny rules win after DNS too, and a special address —
  loopback, unspecified, link-local (the instance metadata), the parent's own addresses — needs an
  allow rule naming it, so neither ``0.0.0.0`` nor a DNS answer for an allowed name (rebinding)
  reaches the parent's own services. We connect only to a vetted address itself, never
  re-resolving, so an answer that changes between check and connect cannot redirect us. `host`
  means the parent instance (`PARENT_ADDRESS`, 127.0.0.1).
* Time. Each phase has an absolute deadline that no trickle of bytes extends: the request frame
  (`Limits.handshake`), name resolution (`Limits.resolve`) and the connection attempts
  (`Limits.connect`). An established tunnel ends when nothing moved either way for `Limits.idle`.
* Count. At most `Limits.connections` connections (handshakes and tunnels) at once; more are
  answered "too many connections" and closed at once, and the first refusal is logged.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from enclaver_rules.link.frames import ConnectResult, FrameDecoder, FrameError, decode_request, encode_result
from enclaver_rules.link.relay import IDLE_TIMEOUT, splice
from enclaver_rules.link.transport import Transport
from enclaver_rules.policy import EgressPolicy, PolicyError, parse_destination
from enclaver_rules.policy.egress import PARENT_ADDRESS, PARENT_NAME, IPAddress
from enclaver_rules.ports import EGRESS_PORT

log = logging.getLogger("enclaver.egress-host")

Resolver = Callable[[str, int], Awaitable[list[str]]]
MAX_ADDRESSES = 32  # of one name's answer, judged and tried; a bigger answer is cut (and said so)
MAX_MESSAGE = 2000  # characters of a refusal sent back: the frame stays far below the transport's buffer
REFUSALS_KEPT = 100  # the latest refusal reasons kept in `HostEgress.refused` (bounded: the app picks them)
CLOSE_GRACE = 5.0  # seconds for a refusal to leave before the socket is aborted


def default_connection_limit() -> int:
    """Two descriptors per tunnel, within this process's soft descriptor limit (and at most 1024)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, (soft - 64) // 2))


@dataclass(frozen=True, slots=True)
class Limits:
    """How long and how many. Deadlines are absolute: they run from the start of their phase and a
    client that drips bytes does not extend them."""

    handshake: float = 10.0  # the whole request frame, from accept
    resolve: float = 10.0  # resolving the name
    connect: float = 10.0  # every connection attempt together
    idle: float = IDLE_TIMEOUT  # an open tunnel on which nothing moved either way for this long is cut
    connections: int = field(default_factory=default_connection_limit)  # open at once


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(str(sockaddr[0]))
    return seen


def is_own_address(address: IPAddress) -> bool:
    """Whether `address` is one of this machine's own: the kernel picks it as the source for a
    route to itself (a UDP connect only looks the route up; nothing is sent)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(address), 9))
            return ipaddress.ip_address(probe.getsockname()[0].split("%")[0]) == address
    except (OSError, ValueError):
        return False  # no route: not ours, and a connection would fail anyway


@dataclass
class HostEgress:
    policy: EgressPolicy
    transport: Transport
    resolver: Resolver = system_resolver
    limits: Limits = field(default_factory=Limits)
    own_address: Callable[[IPAddress], bool] = is_own_address
    #: `--sim-host NAME=IP:PORT` (the simulator): an allowed NAME goes to IP:PORT, with no DNS and no
    #: after-DNS check (the user named the stand-in); the name itself must still pass the policy. An IP
    #: literal may be mapped too (`--sim-imds` maps 169.254.169.254), after it passed the IP rules.
    static_hosts: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # the latest REFUSALS_KEPT reasons, for logs and tests
    open_connections: int = field(default=0, init=False)  # being handled now: handshakes and tunnels
    turned_away: int = field(default=0, init=False)  # refused over the limit since the limit was last reached

    def _own(self, address: IPAddress) -> tuple[IPAddress, ...]:
        return (address,) if self.own_address(address) else ()

    async def vet(self, host: str, port: int) -> tuple[list[str], str]:
        """(addresses we may connect to, why the others — or all — are refused).

        An IP destination must pass the IP rules. A name must pass the name rules; then each address
        it resolves to is judged on its own (`decide_resolved`) and only those that pass are kept.
        """
        try:
            dest = parse_destination(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        except PolicyError as e:
            return [], e.message
        if dest.address is not None:
            decision = self.policy.decide(dest, own=self._own(dest.address))
            if decision.allowed and str(dest.address) in self.static_hosts:  # --sim-imds: 169.254.169.254
                return [self.static_hosts[str(dest.address)][0]], ""
            return ([str(dest.address)], "") if decision.allowed else ([], decision.reason)
        decision = self.policy.decide(dest)
        if not decision.allowed:
            return [], decision.reason
        if dest.host in self.static_hosts:
            return [self.static_hosts[dest.host][0]], ""
        if dest.host == PARENT_NAME:
            candidates = [str(PARENT_ADDRESS)]
        else:
            try:
                async with asyncio.timeout(self.limits.resolve):
                    candidates = await self.resolver(dest.host, port)
            except TimeoutError:
                return [], f"resolving {dest.host} took longer than {self.limits.resolve:g} s"
            except (OSError, UnicodeError) as e:  # UnicodeError: the IDNA codec on a name it dislikes
                return [], f"cannot resolve {dest.host}: {e}"
        usable: list[str] = []
        refused: list[str] = []
        if len(candidates) > MAX_ADDRESSES:
            refused.append(f"{dest.host} resolves to {len(candidates)} addresses; only the first {MAX_ADDRESSES} "
                           "were considered")
        for text in candidates[:MAX_ADDRESSES]:
            try:
                ip = ipaddress.ip_address(str(text).split("%")[0])
            except ValueError:
                refused.append(f"{dest.host} resolves to {text!r}, which is not an IP address")
                continue
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            after_dns = self.policy.decide_resolved(dest, ip, own=self._own(ip))
            if not after_dns.allowed:
                refused.append(after_dns.reason)
            elif str(ip) not in usable:
                usable.append(str(ip))
        return usable, "; ".join(refused)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.limits.connections:
            self._turn_away(writer)
            return
        self.open_connections += 1
        try:
            await self._serve(reader, writer)
        except Exception:  # a bug costs this connection, never the server; asyncio would only print it
            log.exception("egress (host side): connection failed")
            writer.transport.abort()
        finally:
            self.open_connections -= 1
            if self.turned_away and self.open_connections < self.limits.connections:
                log.warning("egress (host side): below the limit of %d connections again; %d were refused meanwhile",
                            self.limits.connections, self.turned_away)
                self.turned_away = 0

    def _turn_away(self, writer: asyncio.StreamWriter) -> None:
        """Over the limit: answer without reading anything, and close."""
        if not self.turned_away:
            log.warning("egress (host side): %d connections open, the limit (Limits.connections); refusing new "
                        "egress connections until some close", self.open_connections)
        self.turned_away += 1
        message = f"the host side of egress has {self.open_connections} connections open, its limit; try again later"
        writer.write(encode_result(ConnectResult(False, errno.EMFILE, message)))
        writer.close()  # a few dozen bytes: they fit the socket's buffer, close does not wait on the peer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder, document = FrameDecoder(), None
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.limits.handshake):
                while document is None:
                    chunk = await reader.read(4096)
                    if not chunk:
                        writer.close()
                        return
                    document = decoder.feed(chunk)
                    if document is None and not decoder.buffer:  # a whole frame holding JSON `null`
                        raise FrameError("handshake must be {\"host\": ..., \"port\": ...}, not null")
            request = decode_request(document)
        except TimeoutError:
            log.info("egress (host side): no complete request within %g s; closed", time.monotonic() - started)
            writer.transport.abort()
            return
        except (FrameError, ValueError, RecursionError) as e:  # RecursionError: json on deep nesting
            log.info("egress (host side): bad request: %s", str(e)[:200])
            writer.transport.abort()
            return
        addresses, why = await self.vet(request.host, request.port)
        if why:
            self.refused.append(why)
            del self.refused[:-REFUSALS_KEPT]  # the app chooses how many: keep the latest only
        if not addresses:
            await self._refuse(writer, errno.EACCES, f"denied by the egress policy on the host: {why}")
            return
        mapped = self.static_hosts.get(request.host.lower().rstrip("."))
        upstream = await self._connect(addresses, mapped[1] if mapped else request.port)
        if isinstance(upstream, OSError):
            await self._refuse(writer, upstream.errno or 0, str(upstream))
            return
        writer.write(encode_result(ConnectResult(True)))
        await splice((reader, writer), upstream, first_to_b=decoder.rest, idle=self.limits.idle)

    async def _connect(self, addresses: list[str],
                       port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | OSError:
        """The first vetted address that answers, all within one deadline; each attempt gets an even
        share of what is left, so one address that never answers cannot starve the others."""
        deadline = time.monotonic() + self.limits.connect
        last = OSError(errno.ETIMEDOUT, f"connecting took longer than {self.limits.connect:g} s")
        for index, address in enumerate(addresses):
            share = (deadline - time.monotonic()) / (len(addresses) - index)
            if share <= 0:
                break
            try:
                return await asyncio.wait_for(asyncio.open_connection(address, port), share)
            except TimeoutError:
                last = OSError(errno.ETIMEDOUT, f"connecting to {address} port {port} timed out")
            except OSError as e:
                last = e
        return last

    async def _refuse(self, writer: asyncio.StreamWriter, code: int, message: str) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE - 20] + " … (cut)"
        try:
            writer.write(encode_result(ConnectResult(False, code, message)))
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), CLOSE_GRACE)
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()

    async def serve(self) -> asyncio.AbstractServer:
        return await self.transport.listen(EGRESS_PORT, self.handle)
