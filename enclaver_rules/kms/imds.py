"""A local IMDSv2 (`enclaver imds serve`): the role credentials and identity an enclave's parent would serve.

Enough of the EC2 instance metadata service for an AWS SDK, odyn's KMS proxy and botocore to get an
instance role's credentials and region off EC2, with credentials that rotate on a lifetime you choose, so
refresh can be tested for real (`boto/botocore botocore/utils.py` is the client this is checked against):

* `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..21600` gives a random token that
  lives that long; a missing or out-of-range TTL is 400. IMDSv2 only, as instances with `HttpTokens:
  required`: a `GET` without a live token is 401.
* `GET /latest/meta-data/iam/security-credentials/` names the role; `…/ROLE` serves the credentials
  document: `Code: Success`, `LastUpdated`, `Type: AWS-HMAC`, the configured access key id and secret, a
  random session `Token` and `Expiration` = issue time + lifetime (`YYYY-MM-DDTHH:MM:SSZ`).
* A new Token and Expiration are issued when a request comes after half the lifetime has passed or when less
  than 5 minutes are left, whichever is first: halfway for a lifetime of 10 minutes or more (so at least 5
  minutes before expiry, as EC2 makes new credentials available "at least five minutes before the
  expiration of the old credentials"), and on every request for a lifetime of 5 minutes or less.
* `GET /latest/dynamic/instance-identity/document` (`region`, `accountId`, `instanceId`,
  `availabilityZone` = region + "a", `instanceType`, …), `/latest/meta-data/placement/availability-zone`,
  `…/placement/region`, `/latest/meta-data/instance-id`, `…/instance-type`. Anything else is 404.

A request target in absolute form (`GET http://169.254.169.254/latest/…`) is served like its path, so this
server can stand in for the forward proxy in front of IMDS too. The access key id and secret are given; the
local KMS accepts any session token for a known access key id, so these credentials work against it.
`LocalImds` answers requests without any I/O (clock and randomness injectable); `serve` puts it behind
a threaded HTTP/1.1 server.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from enclaver_rules.kms.credentials import MAX_TOKEN_TTL, ROLE_PATH, TOKEN_HEADER, TOKEN_PATH, TOKEN_TTL_HEADER

IDENTITY_PATH = "/latest/dynamic/instance-identity/document"
MAX_LIFETIME = 43200  # seconds: the longest role session STS grants (12 hours)
ROTATE_BEFORE = timedelta(minutes=5)
MAX_TOKENS = 4096  # live IMDS tokens kept; past that the one closest to expiry is dropped
MAX_PUT_BODY = 1024
IDLE_TIMEOUT = 10.0  # seconds a connection may sit idle, or take to send a request head

ROLE = re.compile(r"[\w+=,.@-]{1,64}", re.ASCII)
ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9]{1,128}")
REGION = re.compile(r"[a-z]{2}(?:-[a-z0-9]+)+-\d{1,2}")
ACCOUNT = re.compile(r"\d{12}")
INSTANCE_ID = re.compile(r"i-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_TTL = re.compile(r"\d{1,6}")


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _session_token(random_bytes: Callable[[int], bytes]) -> str:
    return base64.b64encode(random_bytes(120)).decode()


class Headers(Protocol):
    """Request headers, looked up case-insensitively (`email.message.Message`, what http.server gives)."""

    def get(self, name: str, /) -> str | None: ...


@dataclass(frozen=True)
class Identity:
    """The long-term key pair the served credentials carry; the secret stays out of `repr`."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Identity:
        """`ACCESS_KEY_ID:SECRET`. The error never quotes the secret."""
        akid, sep, secret = text.partition(":")
        if not sep or not ACCESS_KEY_ID.fullmatch(akid) or not secret or not secret.isprintable():
            raise ValueError("expected ACCESS_KEY_ID:SECRET_ACCESS_KEY (1 to 128 letters and digits, a colon, "
                             "a printable secret)")
        return cls(akid, secret)


@dataclass(frozen=True)
class Instance:
    """What the identity document says about the instance."""

    region: str = "us-east-1"
    account: str = "111122223333"
    instance_id: str = "i-0123456789abcdef0"
    instance_type: str = "m5.xlarge"

    @property
    def availability_zone(self) -> str:
        return self.region + "a"


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Issued:
    token: str = field(repr=False)
    issued: datetime
    expiration: datetime


class LocalImds:
    """The answers of an IMDSv2 for one instance and role. Thread-safe; no I/O."""

    def __init__(self, role: str, identity: Identity, *, lifetime: timedelta = timedelta(hours=1),
                 instance: Instance = Instance(), clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> None:
        if not ROLE.fullmatch(role):
            raise ValueError(f"not an IAM role name: {role!r}")
        if not timedelta(seconds=1) <= lifetime <= timedelta(seconds=MAX_LIFETIME):
            raise ValueError(f"the lifetime must be 1 to {MAX_LIFETIME} seconds")
        self.role, self.identity, self.lifetime, self.instance = role, identity, lifetime, instance
        self._clock, self._random = clock, random_bytes
        self._lock = threading.Lock()
        self._tokens: dict[str, datetime] = {}
        self._current: _Issued | None = None
        self.started = clock()

    @property
    def rotate_after(self) -> timedelta:
        """How long a set is served: half the lifetime, or until 5 minutes are left, whichever is first."""
        return max(timedelta(0), min(self.lifetime / 2, self.lifetime - ROTATE_BEFORE))

    def credentials(self) -> dict[str, str]:
        """The credentials document, issuing a new set first when the current one is due."""
        with self._lock:
            now = self._clock()
            current = self._current
            if current is None or now >= current.issued + self.rotate_after:
                current = _Issued(_session_token(self._random), now, now + self.lifetime)
                self._current = current
        return {"Code": "Success", "LastUpdated": _iso(current.issued), "Type": "AWS-HMAC",
                "AccessKeyId": self.identity.access_key_id, "SecretAccessKey": self.identity.secret_access_key,
                "Token": current.token, "Expiration": _iso(current.expiration)}

    def identity_document(self) -> dict[str, Any]:
        i = self.instance
        return {"accountId": i.account, "architecture": "x86_64", "availabilityZone": i.availability_zone,
                "billingProducts": None, "devpayProductCodes": None, "marketplaceProductCodes": None,
                "imageId": "ami-0123456789abcdef0", "instanceId": i.instance_id, "instanceType": i.instance_type,
                "kernelId": None, "pendingTime": _iso(self.started), "privateIp": "172.31.0.10", "ramdiskId": None,
                "region": i.region, "version": "2017-09-30"}

    def answer(self, method: str, target: str, headers: Headers) -> Answer:
        """The answer to one request (a plain dict for `headers` must use the canonical spellings)."""
        path = _path(target)
        if method == "PUT":
            return self._token(path, headers) if path == TOKEN_PATH else _text(404, "Not Found")
        if method != "GET":
            return Answer(405, b"Method Not Allowed", (("Allow", "GET, PUT"), ("Content-Type", "text/plain")))
        if not self._live(headers.get(TOKEN_HEADER)):
            return _text(401, "Unauthorized")
        return self._metadata(path)

    def _token(self, path: str, headers: Headers) -> Answer:
        ttl_text = (headers.get(TOKEN_TTL_HEADER) or "").strip()
        ttl = int(ttl_text) if _TTL.fullmatch(ttl_text) else 0
        if not 1 <= ttl <= MAX_TOKEN_TTL:
            return _text(400, "Bad Request")
        token = base64.urlsafe_b64encode(self._random(42)).decode()
        with self._lock:
            now = self._clock()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            while len(self._tokens) >= MAX_TOKENS:
                del self._tokens[min(self._tokens, key=self._tokens.__getitem__)]
            self._tokens[token] = now + timedelta(seconds=ttl)
        return Answer(200, token.encode(), (("Content-Type", "text/plain"), (TOKEN_TTL_HEADER, str(ttl))))

    def _live(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            expiry = self._tokens.get(token)
            return expiry is not None and expiry > self._clock()

    def _metadata(self, path: str) -> Answer:
        i = self.instance
        texts = {"/latest/meta-data/placement/availability-zone": i.availability_zone,
                 "/latest/meta-data/placement/region": i.region, "/latest/meta-data/instance-id": i.instance_id,
                 "/latest/meta-data/instance-type": i.instance_type}
        if path in (ROLE_PATH, ROLE_PATH.rstrip("/")):
            return _text(200, self.role)
        if path == ROLE_PATH + self.role:
            return _text(200, json.dumps(self.credentials(), indent=2))
        if path == IDENTITY_PATH:
            return _text(200, json.dumps(self.identity_document(), indent=2))
        text = texts.get(path.rstrip("/") if path != "/" else path)
        return _text(200, text) if text is not None else _text(404, "Not Found")


def _text(status: int, text: str) -> Answer:
    return Answer(status, text.encode(), (("Content-Type", "text/plain"),))


def _path(target: str) -> str:
    """The path of an origin-form or absolute-form (`http://host/path`) target, without its query."""
    if target.startswith(("http://", "https://")):
        return urllib.parse.urlsplit(target).path or "/"
    return target.split("?", 1)[0]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"
    # an answer leaves in one write (head and body buffered, flushed after each request), with no
    # delayed-ACK stall between its pieces and no separate segment a reset could cut off
    disable_nagle_algorithm = True
    wbufsize = 64 << 10
    sys_version = ""
    timeout = IDLE_TIMEOUT
    server: _Server

    def _serve(self) -> None:
        length = self.headers.get("Content-Length", "0").strip()
        if self.headers.get("Transfer-Encoding") or not length.isdigit() or int(length) > MAX_PUT_BODY:
            self.close_connection = True  # a body we will not read: answer, then close
            self._send(_text(400, "Bad Request"))
            return
        self.rfile.read(int(length))
        self._send(self.server.imds.answer(self.command, self.path, self.headers))

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve

    def _send(self, answer: Answer) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request line holds no secret, but a quiet test server is the point


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    imds: LocalImds

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer is not worth a traceback


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(imds: LocalImds, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A listening (not yet serving) HTTP server for `imds`: call `serve_forever` in a thread, then
    `shutdown` and `server_close`."""
    server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
    server.imds = imds
    return server
