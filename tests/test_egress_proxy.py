"""Egress end to end: the enclave's proxy, the tunnel over the (Unix) transport, the host side, real
TCP origins on 127.0.0.1. And the request-head parser under fuzzing."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.policy import EgressPolicy
from enclaver_rules.runtime.egress_host import HostEgress
from odyn.egress import EgressProxy
from odyn.http_head import MAX_HEAD, ClosingResponse, HeadError, HeadReader, absolute_target, connect_target


async def echo_upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()  # until the client half-closes
    writer.write(data.upper())
    await writer.drain()
    writer.close()


class HttpOrigin:
    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        body = b"hello from the origin\n"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()


async def request(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if half_close:
        writer.write_eof()
    result = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return result


async def stack(tmp_path: Path, allow: list[str], deny: list[str] = (), host_deny: list[str] | None = None,  # type: ignore[assignment]
                ssl_context: ssl.SSLContext | None = None) -> tuple[int, HostEgress, list[asyncio.AbstractServer]]:
    host = HostEgress(EgressPolicy.from_lists(allow, host_deny if host_deny is not None else deny),
                      UnixTransport(tmp_path, 2))
    proxy = EgressProxy(EgressPolicy.from_lists(allow, deny), UnixTransport(tmp_path, 16), ssl_context)
    host_server = await host.serve()
    proxy_server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    return proxy_server.sockets[0].getsockname()[1], host, [host_server, proxy_server]


def run(coro) -> object:  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_connect_is_tunnelled_byte_exact_with_half_close(tmp_path: Path) -> None:
    async def main() -> None:
        origin = await asyncio.start_server(echo_upper, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        proxy_port, _, servers = await stack(tmp_path, ["127.0.0.1"])
        answer = await request(proxy_port, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                               + b"raw \x00\xff bytes", half_close=True)
        assert answer == b"HTTP/1.1 200 Connection established\r\n\r\nRAW \x00\xff BYTES"
        for s in [*servers, origin]:
            s.close()

    run(main())


def test_plain_http_is_rewritten_for_the_origin(tmp_path: Path) -> None:
    async def main() -> None:
        http = HttpOrigin()
        origin = await asyncio.start_server(http, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        proxy_port, _, servers = await stack(tmp_path, ["127.0.0.1"])
        answer = await request(proxy_port, (f"GET http://127.0.0.1:{port}/path?q=1 HTTP/1.1\r\nHost: ignored\r\n"
                                            "Proxy-Authorization: Basic c2VjcmV0\r\nConnection: keep-alive, X-Hop\r\n"
                                            "X-Hop: 1\r\nAccept: */*\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"hello from the origin\n")
        head = http.heads[0].decode()
        assert head.startswith("GET /path?q=1 HTTP/1.1\r\n") and f"Host: 127.0.0.1:{port}\r\n" in head
        assert "Proxy-Authorization" not in head and "X-Hop" not in head and "Accept: */*" in head
        assert "Connection: close" in head
        for s in [*servers, origin]:
            s.close()

    run(main())


def _tls_origin(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    return server, client


def test_https_url_in_plain_form_gets_tls_to_the_origin(tmp_path: Path) -> None:
    server_ctx, client_ctx = _tls_origin(tmp_path)

    async def main() -> None:
        http = HttpOrigin()
        origin = await asyncio.start_server(http, "127.0.0.1", 0, ssl=server_ctx)
        port = origin.sockets[0].getsockname()[1]
        proxy_port, _, servers = await stack(tmp_path, ["127.0.0.1"], ssl_context=client_ctx)
        answer = await request(proxy_port, f"GET https://127.0.0.1:{port}/secure HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"hello from the origin" in answer
        assert http.heads[0].startswith(b"GET /secure HTTP/1.1\r\n")
        for s in [*servers, origin]:
            s.close()

    run(main())


def test_host_reaches_the_parent_and_denials_name_the_rule(tmp_path: Path) -> None:
    async def main() -> None:
        origin = await asyncio.start_server(echo_upper, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        proxy_port, _, servers = await stack(tmp_path, ["host", "**.example.com"], deny=["bad.example.com"])
        ok = await request(proxy_port, f"CONNECT host:{port} HTTP/1.1\r\n\r\nping".encode(), half_close=True)
        assert ok.endswith(b"PING")
        denied = await request(proxy_port, b"CONNECT bad.example.com:443 HTTP/1.1\r\n\r\n")
        assert denied.startswith(b"HTTP/1.1 403 Forbidden")
        assert b"denied by deny rule 'bad.example.com' (deny wins over allow rule '**.example.com')" in denied
        default = await request(proxy_port, b"GET http://evil.test/ HTTP/1.1\r\n\r\n")
        assert default.startswith(b"HTTP/1.1 403") and b"default deny" in default
        assert (await request(proxy_port, b"CONNECT nohost HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await request(proxy_port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        for s in [*servers, origin]:
            s.close()

    run(main())


def test_dns_answers_are_checked_on_the_host_at_connect_time(tmp_path: Path) -> None:
    """The name passes in the enclave; on the host it resolves into a denied network: refused."""
    async def main() -> None:
        origin = await asyncio.start_server(echo_upper, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        proxy_port, host, servers = await stack(tmp_path, ["rebind.example.com"], deny=[],
                                                host_deny=["127.0.0.0/8"])

        async def rebinding_resolver(name: str, _port: int) -> list[str]:
            return ["127.0.0.1"]  # e.g. an attacker's DNS answering with a loopback address

        host.resolver = rebinding_resolver
        answer = await request(proxy_port, f"CONNECT rebind.example.com:{port} HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 403") and b"resolves to 127.0.0.1, denied by deny rule '127.0.0.0/8'" in answer
        assert host.refused
        for s in [*servers, origin]:
            s.close()

    run(main())


def test_host_side_refuses_what_the_enclave_should_not_have_asked(tmp_path: Path) -> None:
    """A tampered enclave proxy that skips the check still meets the host's policy."""
    async def main() -> None:
        proxy_port, host, servers = await stack(tmp_path, ["**"], host_deny=[])
        host.policy = EgressPolicy.from_lists(["allowed.example.com"])

        async def resolves(name: str, _port: int) -> list[str]:
            return ["127.0.0.1"]  # so the only thing that can refuse is the policy itself

        host.resolver = resolves
        answer = await request(proxy_port, b"CONNECT other.example.com:443 HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403")
        assert b"denied by the egress policy on the host: no allow rule matches (default deny)" in answer
        for s in servers:
            s.close()

    run(main())


def test_a_refusal_names_the_destination_and_is_logged_once_per_destination(tmp_path: Path) -> None:
    """An AWS SDK shows a proxy's 403 as "Forbidden" only: the body names the destination and the
    policy, and so does a line in odyn's log (the enclave's output), throttled per destination."""
    lines: list[str] = []

    async def main() -> None:
        _, host, servers = await stack(tmp_path, ["kms.sim.internal"])
        proxy = EgressProxy(EgressPolicy.from_lists(["kms.sim.internal"]), UnixTransport(tmp_path, 16), log=lines.append)
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for _ in range(3):  # an SDK retries: one line, not three
            answer = await request(port, b"GET http://s3.sim.internal/no-fly-list/x HTTP/1.1\r\nHost: s3.sim.internal\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
            assert (b"s3.sim.internal:80 is denied by the enclave's egress policy (egress in enclaver.yaml): "
                    b"no allow rule matches (default deny)") in answer
        assert (await request(port, b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403")
        host.policy = EgressPolicy.from_lists(["other.example"])  # the host side refuses what the enclave allowed
        assert (await request(port, b"CONNECT kms.sim.internal:4566 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403")
        for s in [*servers, server]:
            s.close()

    run(main())
    assert lines == [
        "odyn: egress proxy: refused (403 Forbidden) s3.sim.internal:80 is denied by the enclave's egress policy "
        "(egress in enclaver.yaml): no allow rule matches (default deny)",
        "odyn: egress proxy: refused (403 Forbidden) evil.test:443 is denied by the enclave's egress policy "
        "(egress in enclaver.yaml): no allow rule matches (default deny)",
        "odyn: egress proxy: refused (403 Forbidden) kms.sim.internal:4566: denied by the egress policy on the host: "
        "no allow rule matches (default deny)"]


def test_the_log_throttle_remembers_a_bounded_number_of_keys() -> None:
    """The app chooses the keys (denied destinations): the table stays bounded, oldest forgotten first."""
    from odyn.connections import Throttle

    lines: list[str] = []
    say = Throttle(lines.append, every=3600, max_keys=4)
    for i in range(100):
        say(f"k{i}", f"line {i}")
    assert len(lines) == 100 and len(say._last) == 4 and list(say._last) == ["k96", "k97", "k98", "k99"]
    say("k99", "again")  # remembered: held back
    say("k0", "k0 again")  # forgotten long ago: said again
    assert lines[-1] == "k0 again" and "again" not in lines[:-1] and len(say._last) == 4


@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=10))
def test_head_parser_never_crashes_in_any_split(data: bytes, cuts: list[int]) -> None:
    reader, pos = HeadReader(), 0
    try:
        for cut in [*cuts, len(data)]:
            if reader.feed(data[pos:pos + cut]) is not None:
                break
            pos += cut
    except HeadError as e:
        assert e.status in (400, 431)


@given(st.text(max_size=80))
@example(":\u00b2")  # a superscript two is a digit to str.isdigit, not to int(): found by hypothesis
@example("http://h:\u0663/")  # ARABIC-INDIC DIGIT THREE
def test_targets_parse_or_raise_head_error(text: str) -> None:
    for parse in (connect_target, absolute_target):
        try:
            target = parse(text)
            assert 0 < target.port < 65536 and target.host
        except HeadError:
            pass


def test_head_limits() -> None:
    with pytest.raises(HeadError) as e:
        HeadReader().feed(b"GET http://x/ HTTP/1.1\r\n" + b"A: b\r\n" * 20000)
    assert e.value.status == 431
    assert absolute_target("https://example.com/x").port == 443  # upstream used 80 for https too
    assert connect_target("[2001:db8::1]:443").host == "2001:db8::1"


def _closing(data: bytes, cuts: list[int] = ()) -> bytes:  # type: ignore[assignment]
    closing, out, pos = ClosingResponse(), b"", 0
    for cut in [*cuts, len(data)]:
        out += closing.feed(data[pos:pos + cut])
        pos += cut
    return out + closing.feed(data[pos:])


def test_the_answer_says_connection_close_after_its_final_status_line() -> None:
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    assert _closing(body) == (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n"
                              b"Connection: keep-alive\r\n\r\nok")
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    assert _closing(interim + b"HTTP/1.0 404 Not Found\r\n\r\n") == \
        interim + b"HTTP/1.0 404 Not Found\r\nConnection: close\r\n\r\n"
    assert _closing(b"HTTP/1.1 204\r\n\r\n") == b"HTTP/1.1 204\r\nConnection: close\r\n\r\n"
    for unchanged in (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nraw", b"SSH-2.0-x\r\nHTTP/1.1 200 OK\r\n",
                      b"HTTP/1.1 200 OK\nbare: lf\n\n", b"HTTP/2 200\r\n\r\n", b"X" * (MAX_HEAD + 10) + b"\r\n"):
        assert _closing(unchanged) == unchanged
    closing = ClosingResponse()
    assert closing.feed(b"HTTP/1.1 200") == b""  # held until the status line is whole
    assert closing.feed(b" OK\r\nA: b\r\n") == b"HTTP/1.1 200 OK\r\nConnection: close\r\nA: b\r\n"
    assert closing.feed(b"HTTP/1.1 200 OK\r\n") == b"HTTP/1.1 200 OK\r\n"  # the body, as it is


@given(st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 102 x\r\nA: b\r\n\r\n", b""]),
       st.binary(max_size=200), st.lists(st.integers(1, 40), max_size=12))
def test_closing_response_is_the_same_in_any_split(interim: bytes, rest: bytes, cuts: list[int]) -> None:
    for data in (interim + b"HTTP/1.1 200 OK\r\n" + rest, interim + rest, rest):
        out = _closing(data, cuts)
        assert out == _closing(data)
        passed = out.replace(b"Connection: close\r\n", b"", 1) if out != data[:len(out)] else out
        assert data.startswith(passed) and b"\n" not in data[len(passed):]  # one insertion; held: a partial line


def test_a_pooling_client_is_told_the_connection_closes(tmp_path: Path) -> None:
    """An origin that keeps connections alive (and need not echo the proxy's `Connection: close`):
    the app's HTTP client must learn that the proxy closes, or it sends its next request on a
    connection being closed (botocore 1.29 fetching IMDS credentials: "Failed to connect to proxy")."""
    import http.client

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\ntoken")
        await writer.drain()
        await reader.read()  # keeps it open until the proxy closes
        writer.close()

    async def main() -> None:
        origin = await asyncio.start_server(keep_alive, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        proxy_port, _, servers = await stack(tmp_path, ["127.0.0.1"])

        def client() -> tuple[bool, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=20)
            conn.request("PUT", f"http://127.0.0.1:{port}/latest/api/token", headers={"Content-Length": "0"})
            reply = conn.getresponse()
            body = reply.read()
            conn.close()
            return reply.will_close, body

        will_close, body = await asyncio.to_thread(client)
        assert will_close and body == b"token"
        for s in [*servers, origin]:
            s.close()

    run(main())
