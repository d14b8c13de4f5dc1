"""odyn's KMS proxy: the app's KMS calls, attested, signed with the instance's credentials, through egress.

The app points any AWS SDK or CLI at `http://127.0.0.1:<kms_proxy.listen_port>` (odyn sets
`AWS_ENDPOINT_URL_KMS`, which botocore ≥ 1.31 and the other current SDKs honour, and upstream's
`AWS_KMS_ENDPOINT`). For Decrypt, GenerateDataKey, GenerateDataKeyPair, GenerateRandom and
DeriveSharedSecret the proxy adds a `Recipient`: a fresh NSM attestation document whose
`public_key` is the proxy's RSA-2048 key, so KMS can check the enclave's measurements against the
key policy and seal the plaintext to that key; the proxy opens the sealed answer and gives the app
the plaintext where the SDK expects it. Other actions pass through. Every call is signed again
(botocore's SigV4) with the instance role's credentials from IMDSv2 (`ImdsCredentials`, through
the egress proxy, refreshed before they expire; one forced refresh and one retry when KMS refuses
them) and sent through odyn's own egress proxy (CONNECT, then TLS with the endpoint's name), so
the manifest's egress policy decides whether KMS can be reached at all. The rewriting itself is
sans-IO, in `kms_rewrite`; the HTTP front (limits, deadlines, connection cap) is `local_http`.

Bounds: the app's request within `request_timeout` of the accept, at most `max_body` (1 MiB:
KMS requests are a few KiB, the largest field a 256 KiB attestation document the proxy replaces),
`max_connections` at once; the whole KMS exchange (credentials, tunnel, TLS, answer, a retry)
within `kms_timeout`, after which the app gets 504 and the exchange's socket is shut so its worker
thread ends too; KMS's answer at most `max_answer` bytes. A bad answer from KMS, a refusal by the
egress policy, an NSM or IMDS failure: the app gets an error in KMS's shape (`KMSProxyError`, see
`kms_rewrite`) and odyn logs a line — never a crash.

Trust for TLS: certifi's CA bundle, which is inside odyn's binary and so covered by PCR0, rather
than whatever CA store the app's image has (often none at all).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, cast

import certifi
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclaver_rules.kms import cms, wire
from enclaver_rules.link.transport import Handler
from enclaver_rules.manifest.model import KmsEndpoint
from odyn import kms_rewrite
from odyn.api import ApiError, AttestationRequest, Attester, NsmTurns
from odyn.connections import Gate, Log
from odyn.http_head import Request
from odyn.kms_rewrite import AppCall, ProxyError
from odyn.local_http import LocalServer, answer, listen, untracked

NAME = "KMS proxy"
MAX_BODY = 1 << 20
MAX_ANSWER = 1 << 20  # KMS's largest answers (GenerateDataKeyPair RSA-4096, a key policy) are a few KiB
MAX_CONNECTIONS = 64
MAX_KMS_CALLS = 16  # worker threads for exchanges with KMS; more calls wait their turn (within kms_timeout)
REQUEST_TIMEOUT = 10.0  # absolute: from the accept to the last byte of the app's request
KMS_TIMEOUT = 30.0  # absolute: credentials, tunnel, TLS, KMS's answer and a retry (botocore waits 60 s)
NSM_TIMEOUT = 10.0  # the NSM answers in milliseconds; with KMS_TIMEOUT the app hears back within botocore's 60 s
KEY_LIFETIME = 3600.0  # seconds a recipient key is used before the next one replaces it
KEY_USES = 100_000  # or this many attestation documents, whichever comes first
KEY_BITS = 2048  # what the Nitro SDK uses and asks for (kms-recipient notes §2.5)
PASSED_HEADERS = ("content-type", "x-amzn-requestid")  # of KMS's answer, besides its body


class Credentials(Protocol):
    @property
    def access_key_id(self) -> str: ...

    @property
    def secret_access_key(self) -> str: ...

    @property
    def token(self) -> str | None: ...


class CredentialSource(Protocol):
    """`enclaver_rules.kms.credentials.ImdsCredentials`: blocking, thread-safe, refreshes by itself."""

    def get(self) -> Credentials: ...

    def force_refresh(self) -> Credentials: ...


def default_ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


# -- the recipient key ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RecipientKey:
    private_key: rsa.RSAPrivateKey
    spki: bytes  # DER SubjectPublicKeyInfo: the attestation document's public_key

    def unseal(self, blob: bytes) -> bytes:
        return cms.open_enveloped(blob, self.private_key)


def new_key() -> RecipientKey:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    spki = private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    return RecipientKey(private_key, spki)


class KeyRing:
    """The RSA key KMS seals answers to: one at a time, generated in a thread, replaced after
    `lifetime` seconds or `uses` documents.

    Why one key serves many calls. Each call still gets its own fresh attestation document, and it
    is the document, signed by the NSM, that binds the key to this enclave's measurements: KMS
    seals only to the `public_key` inside a document it verified. The private key is made in odyn's
    memory and never leaves it (not written, not logged, not handed to the app), so a sealed answer
    can only be opened here, whichever call it belongs to; the app, which could ask for documents
    over keys of its own through the attestation API, gains nothing from this one. What a fresh key
    per call would add is forward secrecy against a later read of odyn's memory, at the price of a
    key generation (tens to hundreds of milliseconds) per call. Rotation keeps most of that: a key
    read out of memory (a debug-mode enclave, whose memory the host can inspect, or a bug) opens
    only the answers of its own lifetime, and no key is worth stealing for long. Without a key
    yet, a call waits for the first one, which odyn starts generating at start-up (`start`); an
    expired key keeps serving until its successor is ready.
    """

    def __init__(self, lifetime: float = KEY_LIFETIME, uses: int = KEY_USES,
                 clock: Callable[[], float] = time.monotonic, generate: Callable[[], RecipientKey] = new_key) -> None:
        self.lifetime, self.uses, self.clock, self.generate = lifetime, uses, clock, generate
        self.current: RecipientKey | None = None
        self.made = 0  # keys made so far
        self._born = 0.0
        self._used = 0
        self._next: asyncio.Future[RecipientKey] | None = None

    def start(self) -> None:
        """Begin making the next key now, in a thread (from the event loop)."""
        if self._next is None:
            self._next = asyncio.ensure_future(asyncio.to_thread(self.generate))

    async def key(self) -> RecipientKey:
        """The key for one more attestation document."""
        if self._next is not None and (self.current is None or self._next.done()):
            pending = self._next
            try:
                made = await asyncio.shield(pending)
            finally:
                if self._next is pending and pending.done():
                    self._next = None  # a failed generation is tried again by the next call
            if self.current is not made:
                self.current, self._born, self._used = made, self.clock(), 0
                self.made += 1
        if self.current is None:
            self.start()
            return await self.key()
        if self._next is None and (self.clock() - self._born >= self.lifetime or self._used >= self.uses):
            self.start()
        self._used += 1
        return self.current


# -- signing and the exchange with KMS -----------------------------------------------------------


class _Frozen(NamedTuple):
    """What botocore's SigV4Auth reads of credentials (its ReadOnlyCredentials' fields)."""

    access_key: str
    secret_key: str
    token: str | None


def sign(call: AppCall, endpoint: KmsEndpoint, body: bytes, credentials: Credentials) -> list[tuple[str, str]]:
    """The headers of `body` POSTed to `endpoint`, signed (SigV4, service kms, the call's region)."""
    request = AWSRequest(method="POST", url=endpoint.url, data=body,
                         headers={"Host": endpoint.authority, "Content-Type": wire.CONTENT_TYPE,
                                  wire.TARGET_HEADER: call.target})
    frozen = _Frozen(credentials.access_key_id, credentials.secret_access_key, credentials.token)
    SigV4Auth(frozen, "kms", call.region).add_auth(request)
    headers = [(str(k), str(v)) for k, v in request.headers.items()]
    user_agent = f"{call.user_agent} odyn-kms-proxy" if call.user_agent else "odyn-kms-proxy"
    return headers + [("User-Agent", user_agent[:512])]


@dataclass(frozen=True, slots=True)
class KmsAnswer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class _Unbuffered:
    """A socket whose `makefile` does not read ahead: the CONNECT answer is read to its end and not
    a byte further, so what follows (TLS) is left on the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def makefile(self, mode: str) -> object:
        assert mode == "rb", mode  # all http.client's HTTPResponse asks for
        return self.sock.makefile("rb", buffering=0)


class Exchange:
    """POSTs to KMS through odyn's egress proxy: CONNECT host:port, then TLS with the endpoint's
    name (or plain HTTP for an `http://` endpoint), one request per connection. Blocking, for a
    worker thread; `abort()`, from any thread, ends it at once."""

    def __init__(self, egress: tuple[str, int], ssl_context: ssl.SSLContext, step_timeout: float,
                 max_answer: int = MAX_ANSWER) -> None:
        self.egress, self.ssl_context, self.step_timeout, self.max_answer = egress, ssl_context, step_timeout, max_answer
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # the plain method: no TLS state touched

    def _hold(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self._aborted and sock is not None:
                raise TimeoutError

    def post(self, endpoint: KmsEndpoint, headers: list[tuple[str, str]], body: bytes) -> KmsAnswer:
        where = endpoint.authority
        try:
            sock = socket.create_connection(self.egress, timeout=self.step_timeout)
            # http.client writes the head and the body apart: without this the body waits for a
            # delayed ACK (40 ms on Linux) on every call (benchmarks/kms_roundtrip.py measured it)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise ProxyError(502, f"odyn's egress proxy on {self.egress[0]}:{self.egress[1]} is not reachable: "
                                  f"{e.strerror or e}") from None
        try:
            self._hold(sock)
            self._tunnel(sock, endpoint)
            if endpoint.tls:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=endpoint.host)
                self._hold(sock)
            connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=self.step_timeout)
            connection.sock = sock  # already connected: http.client only speaks HTTP on it
            connection.request("POST", "/", body, dict(headers))
            response = connection.getresponse()
            data = response.read(self.max_answer + 1)
            if len(data) > self.max_answer:
                raise ProxyError(502, f"KMS at {where} answered with more than {self.max_answer} bytes")
            return KmsAnswer(response.status, tuple(response.getheaders()), data)
        except ssl.SSLCertVerificationError as e:
            raise ProxyError(502, f"TLS with KMS at {where}: its certificate does not verify "
                                  f"({e.verify_message})") from None
        except ssl.SSLError as e:
            raise ProxyError(502, f"TLS with KMS at {where} failed: {e.reason or type(e).__name__}") from None
        except TimeoutError:
            raise ProxyError(504, f"KMS at {where} did not answer in time") from None
        except (http.client.HTTPException, OSError) as e:
            if self._aborted:
                raise ProxyError(504, f"KMS at {where} did not answer in time") from None
            raise ProxyError(502, f"the exchange with KMS at {where} failed: {type(e).__name__}: {e!s:.200}") from None
        finally:
            self._hold(None)
            sock.close()

    def _tunnel(self, sock: socket.socket, endpoint: KmsEndpoint) -> None:
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        target = f"{host}:{endpoint.port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode("ascii"))
        reply = http.client.HTTPResponse(cast(socket.socket, _Unbuffered(sock)), method="CONNECT")
        reply.begin()
        if reply.status == 200:
            return
        text = " ".join(reply.read(2000).decode("utf-8", "replace").split()) or reply.reason
        status = reply.status if reply.status in (403, 504) else 502
        fix = " (add it to egress.allow)" if reply.status == 403 else ""
        # The egress proxy's own 403 body already starts with the destination: say it once.
        what = "" if text.startswith(target) else f" {target}"
        raise ProxyError(status, f"odyn's egress proxy refused{what} ({reply.status}): {text}{fix}")


# -- the proxy ------------------------------------------------------------------------------------


@dataclass
class KmsProxy:
    attester: Attester
    credentials: CredentialSource
    endpoint: Callable[[str], KmsEndpoint]  # region → where its calls go (`manifest.kms_proxy.endpoint`)
    egress: tuple[str, int]  # odyn's egress proxy
    ssl_context: ssl.SSLContext | None = None  # default: certifi's bundle
    keys: KeyRing = field(default_factory=KeyRing)
    request_timeout: float = REQUEST_TIMEOUT
    kms_timeout: float = KMS_TIMEOUT
    nsm_timeout: float = NSM_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_body: int = MAX_BODY
    max_answer: int = MAX_ANSWER
    log: Log | None = None
    server: LocalServer = field(init=False)
    _nsm: NsmTurns = field(init=False)
    _pool: concurrent.futures.ThreadPoolExecutor = field(init=False)
    _exchanges: set[Exchange] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.server = LocalServer(NAME, self, self.request_timeout, self.max_connections, self.max_body, self.log)
        self._nsm = NsmTurns(self.attester, self.nsm_timeout)
        self._pool = concurrent.futures.ThreadPoolExecutor(MAX_KMS_CALLS, thread_name_prefix="odyn-kms")
        if self.ssl_context is None:
            self.ssl_context = default_ssl_context()

    @property
    def gate(self) -> Gate:
        return self.server.gate

    def start(self) -> None:
        """Start making the first recipient key (from the event loop), before the app's first call."""
        self.keys.start()

    def close(self) -> None:
        """End the exchanges in flight and the worker threads (odyn is stopping)."""
        for exchange in list(self._exchanges):
            exchange.abort()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.server.handle(reader, writer)

    def route(self, request: Request) -> None:
        kms_rewrite.route(request)

    def error(self, status: int, message: str, *, head_only: bool = False) -> bytes:
        return answer(status, ProxyError(status, message).body(), wire.CONTENT_TYPE, head_only=head_only)

    async def respond(self, request: Request, body: bytes) -> bytes:
        try:
            call = kms_rewrite.app_call(request, body)
            result = await self.forward(call)
        except ProxyError as e:
            if e.status >= 500 or e.status == 403:
                self.server.say(str(e.status), f"odyn: {NAME}: {e.message}")
            return self.error(e.status, e.message)
        headers = [(k, v) for k, v in result.headers if k.lower() in PASSED_HEADERS and k.lower() != "content-type"]
        content_type = next((v for k, v in result.headers if k.lower() == "content-type"), wire.CONTENT_TYPE)
        return answer(result.status, result.body, content_type, headers=headers)

    async def forward(self, call: AppCall) -> KmsAnswer:
        """KMS's answer to `call`, attested and opened for a Recipient action; ProxyError otherwise."""
        key: RecipientKey | None = None
        payload = call.body
        if call.attested:
            key = await self.keys.key()
            try:
                document = await self._nsm.attest(AttestationRequest(public_key=key.spki))
            except ApiError as e:
                raise ProxyError(e.status, f"no attestation document for {call.action}: {e.message}") from None
            payload = kms_rewrite.with_recipient(call, document)
        endpoint = self.endpoint(call.region)
        result, notes = await self._exchange(call, endpoint, payload)
        for note in notes:
            self.server.say("credentials", f"odyn: {NAME}: {note}")
        body = kms_rewrite.open_answer(call, result.status, result.body, key.unseal if key else _never)
        return KmsAnswer(result.status, result.headers, body)

    async def _exchange(self, call: AppCall, endpoint: KmsEndpoint, payload: bytes) -> tuple[KmsAnswer, list[str]]:
        assert self.ssl_context is not None
        exchange = Exchange(self.egress, self.ssl_context, self.kms_timeout, self.max_answer)
        self._exchanges.add(exchange)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.kms_timeout):
                return await loop.run_in_executor(self._pool, self._call, exchange, call, endpoint, payload)
        except TimeoutError:
            raise ProxyError(504, f"no answer from KMS at {endpoint.authority} within {self.kms_timeout:g} s") from None
        except RuntimeError:  # the pool was shut down: odyn is stopping
            raise ProxyError(503, "odyn is stopping") from None
        finally:
            exchange.abort()  # a no-op once it is done; otherwise its thread ends now
            self._exchanges.discard(exchange)

    def _call(self, exchange: Exchange, call: AppCall, endpoint: KmsEndpoint,
              payload: bytes) -> tuple[KmsAnswer, list[str]]:
        """In a worker thread: sign, send, and once more with fresh credentials if KMS refused them."""
        notes: list[str] = []
        credentials = _credentials(self.credentials.get)
        result = exchange.post(endpoint, sign(call, endpoint, payload, credentials), payload)
        code = kms_rewrite.error_code(result.body) if result.status != 200 else None
        if code in kms_rewrite.CREDENTIAL_ERRORS:
            credentials = _credentials(self.credentials.force_refresh)
            notes.append(f"KMS refused the instance's credentials ({code}); fetched new ones from IMDS and retried "
                         "once")
            result = exchange.post(endpoint, sign(call, endpoint, payload, credentials), payload)
        return result, notes


def _credentials(fetch: Callable[[], Credentials]) -> Credentials:
    try:
        return fetch()
    except OSError as e:  # ImdsError; a refusal by the egress policy shows here too
        raise ProxyError(503, f"no AWS credentials from the instance metadata service: {e!s:.300}") from None


def _never(blob: bytes) -> bytes:
    raise AssertionError("only a Recipient action's answer is opened")


async def serve(proxy: KmsProxy, port: int, track: Callable[[Handler], Handler] = untracked, *,
                host: str = "127.0.0.1") -> asyncio.AbstractServer:
    """Listen on `host:port` (127.0.0.1: only the enclave's own processes can reach it; never expose
    this port through ingress, or anyone could decrypt with the enclave's attestation)."""
    return await listen(proxy.handle, NAME, port, track, host=host)

