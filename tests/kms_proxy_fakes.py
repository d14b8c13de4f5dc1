"""Fakes for the KMS proxy's tests: an NSM, a KMS on 127.0.0.1 that checks what it gets (the
Recipient, the SigV4 signature) and seals its answers with `cms.build_enveloped`, credentials that
rotate, and odyn's egress stack in front (the enclave's proxy, the host side, over Unix sockets)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclaver_rules.kms import cms, wire
from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.policy import EgressPolicy
from enclaver_rules.runtime.egress_host import HostEgress
from odyn.egress import EgressProxy
from odyn.http_head import HeadReader, request_framing

FAKE_DOCUMENT = b"fake-attestation-document:"
PLAINTEXTS = {"Decrypt": b"the decrypted secret", "GenerateDataKey": bytes(range(32)),
              "GenerateDataKeyPair": b"0\x82\x04\xbe PKCS#8 private key DER", "GenerateRandom": b"\x07" * 16,
              "DeriveSharedSecret": b"\x5a" * 32}


class FakeNsm:
    """Documents that carry the public key in the clear after a fixed prefix; records calls."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[bytes | None, bytes | None, bytes | None]] = []
        self.error = error
        self._lock = threading.Lock()

    def attestation(self, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes:
        with self._lock:
            self.calls.append((user_data, nonce, public_key))
        if self.error is not None:
            raise self.error
        return FAKE_DOCUMENT + (public_key or b"")


def fake_public_key(document: bytes) -> bytes:
    if not document.startswith(FAKE_DOCUMENT):
        raise ValueError("not a fake attestation document")
    return document[len(FAKE_DOCUMENT):]


@dataclass(frozen=True)
class Creds:
    access_key_id: str
    secret_access_key: str
    token: str | None = None
    expiration: datetime | None = None


class FakeCredentials:
    """Hands out `first` until forced to refresh, then `second`, `third` …; or raises `error`."""

    def __init__(self, *sets: Creds, error: OSError | None = None) -> None:
        self.sets, self.error = list(sets), error
        self.index = 0
        self.gets = 0
        self.refreshes = 0

    def get(self) -> Creds:
        self.gets += 1
        if self.error is not None:
            raise self.error
        return self.sets[self.index]

    def force_refresh(self) -> Creds:
        self.refreshes += 1
        self.index = min(self.index + 1, len(self.sets) - 1)
        return self.sets[self.index]


INSTANCE = Creds("ASIAINSTANCE1", "instance-secret-1", "session-token-1")
ROTATED = Creds("ASIAINSTANCE2", "instance-secret-2", "session-token-2")
APP = Creds("AKIDAPPDUMMY", "app-dummy-secret")


# -- SigV4 --------------------------------------------------------------------------------------

_AUTHORIZATION = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/([0-9]{8})/([^/]+)/([^/]+)/aws4_request, "
                            r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})")


def verify_sigv4(method: str, path: str, headers: dict[str, str], body: bytes,
                 secrets: dict[str, str]) -> tuple[str | None, str]:
    """(access key id, "") when the request is signed with the secret `secrets` holds for its key;
    (key or None, why) otherwise. Recomputed with botocore's SigV4Auth over exactly the headers the
    signature names (the session token among them, when there is one)."""
    match = _AUTHORIZATION.fullmatch(headers.get("authorization", ""))
    if match is None:
        return None, "no SigV4 Authorization header"
    akid, date, region, service, signed, signature = match.groups()
    secret = secrets.get(akid)
    if secret is None:
        return akid, "unknown access key"
    if service != "kms" or not headers.get("x-amz-date", "").startswith(date):
        return akid, "bad scope"
    names = signed.split(";")
    if "host" not in names or any(n not in headers for n in names):
        return akid, "a signed header is missing"
    if "x-amz-security-token" in headers and "x-amz-security-token" not in names:
        return akid, "the session token is not signed"
    request = AWSRequest(method=method, url=f"http://{headers['host']}{path}", data=body,
                         headers={n: headers[n] for n in names})
    request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(ReadOnlyCredentials(akid, secret, headers.get("x-amz-security-token")), "kms", region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    return (akid, "") if expected == signature else (akid, "signature does not match")


# -- the fake KMS --------------------------------------------------------------------------------


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes
    action: str
    access_key: str | None
    signature_problem: str

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class FakeKms:
    """AWS JSON 1.1 on 127.0.0.1. Accepts only `valid` credentials (others: ExpiredTokenException),
    seals Recipient answers to the document's key; `mode` breaks answers on purpose."""

    valid: dict[str, Creds] = field(default_factory=lambda: {INSTANCE.access_key_id: INSTANCE})
    #: (access key id, session token) → still valid? Default: `valid` holds that key with that token.
    accept: Callable[[str, str | None], bool] | None = None
    secrets: dict[str, str] = field(default_factory=lambda: {c.access_key_id: c.secret_access_key
                                                             for c in (INSTANCE, ROTATED, APP)})
    public_key_of: Callable[[bytes], bytes] = fake_public_key
    mode: str = "ok"  # ok | no-cfr | garbage-cms | bad-json | denied | silent | big
    seen: list[Seen] = field(default_factory=list)
    ssl_context: ssl.SSLContext | None = None
    port: int = 0
    server: asyncio.AbstractServer | None = None

    async def start(self) -> FakeKms:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = HeadReader()
            request = None
            while request is None:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                request = head.feed(chunk)
            length = request_framing(request).length
            body = head.rest
            while len(body) < length:
                body += await reader.read(length - len(body))
            headers = {k.lower(): v for k, v in request.headers}
            status, answer, extra = self.answer(request.target, headers, body)
            if status == 0:
                await asyncio.sleep(3600)  # silent: never answers
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {wire.CONTENT_TYPE}\r\nContent-Length: {len(answer)}\r\n"
                         f"x-amzn-RequestId: req-{len(self.seen)}\r\n{extra}Connection: close\r\n\r\n".encode() + answer)
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
        action = wire.action_of(headers.get("x-amz-target", ""))
        akid, problem = verify_sigv4("POST", path, headers, body, self.secrets)
        self.seen.append(Seen(headers, body, action, akid, problem))
        if problem:
            return 400, wire.error_body("InvalidSignatureException", problem), ""
        assert akid is not None
        token = headers.get("x-amz-security-token")
        if not (self.accept(akid, token) if self.accept is not None else
                akid in self.valid and self.valid[akid].token == token):
            return 400, wire.error_body("ExpiredTokenException", "The security token included in the request is "
                                                                 "expired"), ""
        if self.mode == "denied":
            return 400, wire.error_body("AccessDeniedException", "not for you"), "x-amzn-Extra: dropped\r\n"
        if self.mode == "silent":
            return 0, b"", ""
        if self.mode == "bad-json":
            return 200, b"this is not json", ""
        request = json.loads(body)
        if self.mode == "big":
            return 200, json.dumps({"Pad": "x" * (2 << 20)}).encode(), ""
        if action == "Encrypt":
            blob = base64.b64encode(b"cipher:" + base64.b64decode(request["Plaintext"])).decode()
            return 200, json.dumps({"CiphertextBlob": blob, "KeyId": request["KeyId"],
                                    "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}).encode(), ""
        if action not in wire.RECIPIENT_ACTIONS:
            return 200, b"{}", ""
        recipient = request.get("Recipient")
        assert recipient is not None and recipient["KeyEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256", recipient
        public_key = self.public_key_of(base64.b64decode(recipient["AttestationDocument"]))
        plaintext = PLAINTEXTS[action]
        if action == "GenerateRandom":
            plaintext = plaintext[:1] * int(request.get("NumberOfBytes", 16))
        sealed = cms.build_enveloped(plaintext, public_key)
        if self.mode == "garbage-cms":
            sealed = sealed[:40] + b"\x00" * 40
        answer: dict[str, Any] = {wire.RECIPIENT_ACTIONS[action]: None, "KeyId": "arn:aws:kms:us-east-1:1:key/k"}
        if action == "GenerateDataKey":
            answer["CiphertextBlob"] = base64.b64encode(b"wrapped data key").decode()
        if action == "GenerateDataKeyPair":
            answer.update(PublicKey=base64.b64encode(b"public").decode(), KeyPairSpec="RSA_2048")
        if self.mode != "no-cfr":
            answer["CiphertextForRecipient"] = base64.b64encode(sealed).decode()
        return 200, json.dumps(answer).encode(), ""


# -- odyn's egress stack -----------------------------------------------------------------------------


async def egress_stack(directory: Path, allow: list[str],
                       deny: list[str] | None = None) -> tuple[int, list[asyncio.AbstractServer]]:
    """The enclave's egress proxy on 127.0.0.1 and the host side, talking over Unix sockets in
    `directory`, both with the same policy. Returns the proxy's port and the servers to close."""
    policy = EgressPolicy.from_lists(allow, deny or [])
    host = HostEgress(policy, UnixTransport(directory, 2))
    proxy = EgressProxy(policy, UnixTransport(directory, 16))
    servers = [await host.serve(), await asyncio.start_server(proxy.handle, "127.0.0.1", 0)]
    return servers[1].sockets[0].getsockname()[1], servers


# -- TLS for an https:// endpoint ------------------------------------------------------------------


def tls_pair(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for 127.0.0.1, client context trusting only its test CA); `directory` holds the
    server's key file for a moment."""
    now = datetime.now(UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms proxy test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(2)
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    path = directory / "kms-server.pem"
    path.write_bytes(leaf.public_bytes(pem) + leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                     serialization.NoEncryption()))
    try:
        server.load_cert_chain(path)
    finally:
        path.unlink()
    client = ssl.create_default_context(cadata=ca.public_bytes(pem).decode())
    return server, client
