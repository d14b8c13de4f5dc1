"""The IMDSv2 credentials client of odyn's KMS proxy: the protocol, botocore's refresh rules on a fake
clock, a forward proxy in the path, hostile answers, and secrets kept out of logs and errors."""

from __future__ import annotations

import ast
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imds_helpers import ForwardProxy

from conftest import REPO
from enclaver_rules import redact
from enclaver_rules.kms.credentials import Credentials, ImdsCredentials, ImdsError, parse_credentials

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
ROLE = "enclave-role"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
WAIT = 10.0  # generous bound on a thread join: a hang fails the test instead of the run


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class FakeImds:
    """A scriptable IMDSv2: what it serves, what it counts, where it blocks."""

    role: str | None = ROLE
    expiration: datetime = T0 + timedelta(hours=1)
    serial: int = 0  # bumped per credentials answer: AKID and token change with it
    credentials_status: int = 200
    credentials_body: bytes | None = None  # served as-is instead of the document
    token_status: int = 200
    gate: threading.Event | None = None  # a credentials GET waits for it
    entered: threading.Event = field(default_factory=threading.Event)
    tokens: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: {"token": 0, "role": 0, "credentials": 0, "identity": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def document(self) -> dict[str, Any]:
        return {"Code": "Success", "LastUpdated": iso(T0), "Type": "AWS-HMAC",
                "AccessKeyId": f"ASIAFAKE{self.serial:012d}", "SecretAccessKey": f"{SECRET}{self.serial}",
                "Token": f"session-token-{self.serial}-" + "x" * 40, "Expiration": iso(self.expiration)}

    def answer(self, method: str, path: str, headers: Any) -> tuple[int, bytes]:
        with self.lock:
            if method == "PUT":
                if path != "/latest/api/token":
                    return 404, b""
                self.counts["token"] += 1
                if self.token_status != 200:
                    return self.token_status, b""
                token = f"imds-token-{self.counts['token']}"
                self.tokens.add(token)
                return 200, token.encode()
            if headers.get("X-aws-ec2-metadata-token") not in self.tokens:
                return 401, b""
        if path == "/latest/meta-data/iam/security-credentials/":
            self.counts["role"] += 1
            return (200, self.role.encode()) if self.role else (404, b"")
        if path == "/latest/dynamic/instance-identity/document":
            self.counts["identity"] += 1
            return 200, json.dumps({"region": "eu-west-3", "accountId": "111122223333"}).encode()
        if self.role and path == f"/latest/meta-data/iam/security-credentials/{self.role}":
            with self.lock:
                self.counts["credentials"] += 1
                self.serial += 1
                body = self.credentials_body or json.dumps(self.document()).encode()
            self.entered.set()
            if self.gate is not None:
                assert self.gate.wait(WAIT)
            return self.credentials_status, body
        return 404, b""


def serve_fake(fake: FakeImds) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            status, body = fake.answer(self.command, self.path, self.headers)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # a client that left
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def fake() -> Iterator[tuple[FakeImds, str]]:
    imds = FakeImds()
    server = serve_fake(imds)
    try:
        yield imds, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        if imds.gate is not None:
            imds.gate.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record of enclaver's loggers, whatever an earlier test did to propagation."""
    found: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record)

    logger = logging.getLogger("enclaver.credentials")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def no_secret_in(text: str) -> bool:
    return SECRET not in text and "session-token-" not in text and "imds-token-" not in text


def client(url: str, clock: Clock, **kwargs: Any) -> ImdsCredentials:
    kwargs.setdefault("jitter", lambda: timedelta(minutes=5))
    return ImdsCredentials(url, clock=clock, **kwargs)


# -- the protocol ---------------------------------------------------------------------------------------


def test_first_get_fetches_a_token_the_role_and_the_credentials(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    creds = client(url, Clock()).get()
    assert creds == Credentials("ASIAFAKE000000000001", SECRET + "1", "session-token-1-" + "x" * 40,
                                T0 + timedelta(hours=1))
    assert imds.counts == {"token": 1, "role": 1, "credentials": 1, "identity": 0}


def test_the_region_comes_from_the_identity_document_once(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    c = client(url, Clock())
    assert c.region() == c.region() == "eu-west-3"
    assert imds.counts["identity"] == 1 and imds.counts["token"] == 1


def test_the_token_is_reused_and_fetched_again_after_a_401(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    c = client(url, Clock())
    c.get()
    c.region()
    assert imds.counts["token"] == 1
    imds.tokens.clear()  # IMDS forgot every token (its TTL ran out, or it restarted)
    c.force_refresh()
    assert imds.counts["token"] == 2 and imds.counts["credentials"] == 2


def test_two_401s_in_a_row_are_an_error(fake: tuple[FakeImds, str], monkeypatch: pytest.MonkeyPatch) -> None:
    imds, url = fake
    original = imds.answer

    def forgetful(method: str, path: str, headers: Any) -> tuple[int, bytes]:
        status, body = original(method, path, headers)
        imds.tokens.clear() if method == "PUT" else None
        return status, body

    monkeypatch.setattr(imds, "answer", forgetful)
    with pytest.raises(ImdsError, match="401 Unauthorized for GET /latest/meta-data/iam/security-credentials/"):
        client(url, Clock()).get()
    assert imds.counts["token"] == 2


def test_the_token_is_fetched_again_before_its_ttl_runs_out(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    clock = Clock()
    c = client(url, clock, token_ttl=120)
    c.get()
    clock.advance(seconds=59)
    c.force_refresh()
    assert imds.counts["token"] == 1
    clock.advance(seconds=2)  # 61 s of 120: less than a minute left
    c.force_refresh()
    assert imds.counts["token"] == 2


@pytest.mark.parametrize("status", [403, 404, 405])
def test_no_imdsv2_token_is_a_clear_error(fake: tuple[FakeImds, str], status: int) -> None:
    imds, url = fake
    imds.token_status = status
    with pytest.raises(ImdsError, match=rf"answered {status} .* for PUT /latest/api/token: no IMDSv2 token"):
        client(url, Clock()).get()


def test_no_role_attached(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    imds.role = None
    with pytest.raises(ImdsError, match="no IAM role attached to this instance"):
        client(url, Clock()).get()


def test_a_credentials_404_names_the_path(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    imds.credentials_status = 404
    with pytest.raises(ImdsError, match=f"answered 404 Not Found for GET /latest/meta-data/iam/security-credentials/{ROLE}"):
        client(url, Clock()).get()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="token_ttl"):
        ImdsCredentials(token_ttl=21601)
    with pytest.raises(ValueError, match="base URL"):
        ImdsCredentials("https://169.254.169.254")


# -- refresh ------------------------------------------------------------------------------------------


def test_no_refresh_outside_the_advisory_window(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    clock = Clock()
    c = client(url, clock)
    first = c.get()
    clock.now = imds.expiration - timedelta(minutes=15)  # exactly 15 minutes left: not yet
    assert c.get() is first
    assert imds.counts["credentials"] == 1


def _in_threads(n: int, call: Callable[[], Credentials]
                ) -> tuple[list[threading.Thread], list[Credentials], threading.Semaphore]:
    """`n` threads making `call`; each result is appended, and the semaphore released, as it returns."""
    results: list[Credentials] = []
    finished = threading.Semaphore(0)

    def run() -> None:
        try:
            results.append(call())
        finally:
            finished.release()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results, finished


def test_advisory_window_one_caller_refreshes_the_others_keep_the_old_set(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    clock = Clock()
    c = client(url, clock, timeout=3 * WAIT)
    old = c.get()
    imds.expiration += timedelta(hours=1)
    clock.now = T0 + timedelta(minutes=48)  # 12 minutes left: advisory
    imds.gate, imds.entered = threading.Event(), threading.Event()
    threads, results, finished = _in_threads(8, c.get)
    assert imds.entered.wait(WAIT)  # one caller is fetching, and held there
    for _ in range(7):  # all the others return meanwhile, with the old set
        assert finished.acquire(timeout=WAIT)
    assert results == [old] * 7
    imds.gate.set()
    for t in threads:
        t.join(WAIT)
    assert imds.counts["credentials"] == 2
    assert results[-1].access_key_id == "ASIAFAKE000000000002" and c.get() == results[-1]


def test_a_failed_advisory_refresh_keeps_the_old_set_and_logs(fake: tuple[FakeImds, str],
                                                              records: list[logging.LogRecord]) -> None:
    imds, url = fake
    clock = Clock()
    c = client(url, clock)
    old = c.get()
    imds.credentials_status = 500
    clock.now = T0 + timedelta(minutes=48)
    assert c.get() is old
    assert imds.counts["credentials"] == 2
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keeping the current set" in warnings[0] and "500" in warnings[0]
    imds.credentials_status = 200
    assert c.get().access_key_id == "ASIAFAKE000000000003"  # the next call tries again, and succeeds


def test_a_failed_mandatory_refresh_raises(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    clock = Clock()
    c = client(url, clock)
    c.get()
    imds.credentials_status = 500
    clock.now = T0 + timedelta(minutes=51)  # 9 minutes left: mandatory
    with pytest.raises(ImdsError, match="500 Internal Server Error"):
        c.get()


def test_mandatory_window_callers_wait_for_one_refresh(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    clock = Clock()
    c = client(url, clock, timeout=3 * WAIT)
    c.get()
    imds.expiration += timedelta(hours=1)
    clock.now = T0 + timedelta(minutes=55)
    imds.gate, imds.entered = threading.Event(), threading.Event()
    threads, results, finished = _in_threads(6, c.get)
    assert imds.entered.wait(WAIT)
    assert not finished.acquire(timeout=0.1) and results == []  # nobody went on with the old set
    imds.gate.set()
    for t in threads:
        t.join(WAIT)
    assert imds.counts["credentials"] == 2
    assert len(results) == 6 and {r.access_key_id for r in results} == {"ASIAFAKE000000000002"}


def test_the_first_get_fails_loudly(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    imds.credentials_status = 503
    with pytest.raises(ImdsError, match="503"):
        client(url, Clock()).get()


def test_force_refresh_fetches_now(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    c = client(url, Clock())
    c.get()
    assert c.force_refresh().access_key_id == "ASIAFAKE000000000002"
    assert c.force_refresh().access_key_id == "ASIAFAKE000000000003"
    assert c.get().access_key_id == "ASIAFAKE000000000003"
    assert imds.counts == {"token": 1, "role": 3, "credentials": 3, "identity": 0}


def test_force_refresh_failure_raises_and_keeps_the_set(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    c = client(url, Clock())
    old = c.get()
    imds.credentials_status = 500
    with pytest.raises(ImdsError):
        c.force_refresh()
    assert c.get() is old


class CountingLock:
    """A lock that says how many callers reached it."""

    def __init__(self) -> None:
        self.lock, self.arrived = threading.Lock(), threading.Semaphore(0)

    def acquire(self, blocking: bool = True) -> bool:
        self.arrived.release()
        return self.lock.acquire(blocking)

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_callers_forcing_together_cause_one_fetch_after_the_one_in_flight(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    c = client(url, Clock(), timeout=3 * WAIT)
    c.get()
    lock = CountingLock()
    c._lock = lock  # type: ignore[assignment]
    imds.gate, imds.entered = threading.Event(), threading.Event()
    first, _, _ = _in_threads(1, c.force_refresh)
    assert imds.entered.wait(WAIT) and lock.arrived.acquire(timeout=WAIT)
    others, results, _ = _in_threads(4, c.force_refresh)
    for _ in others:
        assert lock.arrived.acquire(timeout=WAIT)  # all four asked while the first fetch was in flight
    imds.gate.set()
    for t in first + others:
        t.join(WAIT)
    # the fetch in flight may have begun before the set expired: one more, shared by all four
    assert imds.counts["credentials"] == 3
    assert {r.access_key_id for r in results} == {"ASIAFAKE000000000003"}


# -- static stability ---------------------------------------------------------------------------------------


def test_static_stability_uses_credentials_inside_the_window_and_logs(fake: tuple[FakeImds, str],
                                                                     records: list[logging.LogRecord]) -> None:
    imds, url = fake
    clock = Clock()
    imds.expiration = T0 + timedelta(minutes=3)
    c = client(url, clock, jitter=lambda: timedelta(minutes=5))
    creds = c.get()
    assert creds.expiration == T0 + timedelta(minutes=3)  # what IMDS said
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "static stability" in infos[0] and "2025-01-01T12:15:00Z" in infos[0]
    assert c.get() is creds and imds.counts["credentials"] == 1  # 15 minutes left of the extended time
    imds.credentials_status = 503  # IMDS is down
    clock.advance(minutes=4)  # past the real expiration; 11 minutes left of the extended time: advisory
    assert c.get() is creds and imds.counts["credentials"] == 2  # tried, and kept the set
    imds.credentials_status = 200
    clock.advance(minutes=2)  # 9 minutes left: mandatory
    assert c.get() is not creds and imds.counts["credentials"] == 3


def test_static_stability_accepts_expired_credentials(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    imds.expiration = T0 - timedelta(hours=2)
    assert client(url, Clock()).get().expiration == T0 - timedelta(hours=2)


def test_credentials_outside_the_window_are_not_extended(fake: tuple[FakeImds, str],
                                                         records: list[logging.LogRecord]) -> None:
    imds, url = fake
    imds.expiration = T0 + timedelta(minutes=16)
    clock = Clock()
    c = client(url, clock, jitter=lambda: timedelta(minutes=5))  # 15 < 16: not extended
    c.get()
    assert not [r for r in records if "static stability" in r.getMessage()]
    clock.advance(minutes=7)  # 9 minutes left of the real expiration: mandatory
    c.get()
    assert imds.counts["credentials"] == 2


# -- through a forward proxy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["http://169.254.169.254", "upstream"])
def test_through_a_forward_proxy_in_absolute_form(fake: tuple[FakeImds, str], base: str) -> None:
    _, url = fake
    port = int(url.rsplit(":", 1)[1])
    proxy = ForwardProxy(("127.0.0.1", port))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        origin = url if base == "upstream" else base
        c = ImdsCredentials(origin, proxy=("127.0.0.1", proxy.server_address[1]), clock=Clock())
        assert c.get().access_key_id == "ASIAFAKE000000000001"
        assert c.region() == "eu-west-3"
    finally:
        proxy.shutdown()
        proxy.server_close()
    netloc = origin.removeprefix("http://")
    assert proxy.seen == [
        (f"PUT http://{netloc}/latest/api/token HTTP/1.1", netloc),
        (f"GET http://{netloc}/latest/meta-data/iam/security-credentials/ HTTP/1.1", netloc),
        (f"GET http://{netloc}/latest/meta-data/iam/security-credentials/{ROLE} HTTP/1.1", netloc),
        (f"GET http://{netloc}/latest/dynamic/instance-identity/document HTTP/1.1", netloc),
    ]


def test_a_proxy_that_refuses_is_named() -> None:
    raw = RawServer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\ndenied")
    try:
        with pytest.raises(ImdsError, match=rf"through the proxy at 127.0.0.1:{raw.port}\) answered 403 Forbidden"):
            ImdsCredentials(proxy=("127.0.0.1", raw.port), clock=Clock()).get()
    finally:
        raw.close()


# -- hostile answers ----------------------------------------------------------------------------------


def doc(**changes: Any) -> bytes:
    base = {"Code": "Success", "AccessKeyId": "ASIAFAKE", "SecretAccessKey": SECRET, "Token": "tok",
            "Expiration": "2025-01-01T13:00:00Z"}
    base.update(changes)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


@pytest.mark.parametrize("body, message", [
    (b"{", "is not JSON"),
    (b"\xff\xfe", "is not JSON"),
    (b"[" * 50000 + b"]" * 50000, "is not JSON"),
    (b"[]", "not a JSON object"),
    (doc(Code="AssumeRoleUnauthorizedAccess", Message="EC2 cannot assume the role"),
     "refused the credentials of role r: AssumeRoleUnauthorizedAccess: EC2 cannot assume the role"),
    (doc(Code=7), "refused the credentials of role r: 7"),
    (doc(AccessKeyId=None), "lacks AccessKeyId"),
    (doc(SecretAccessKey=None, Token=None), "lacks SecretAccessKey, Token"),
    (doc(Token=["x"]), "lacks Token"),
    (doc(Expiration=""), "lacks Expiration"),
    (doc(Expiration="tomorrow"), "Expiration that is not an ISO 8601 time"),
    (doc(AccessKeyId="AKIA\r\nX-Evil: 1"), "AccessKeyId that is not"),
    (doc(Token="a b"), "Token that is not"),
    (doc(Token="t\r\nX-Evil: 1"), "Token that is not"),
])
def test_bad_credentials_documents(body: bytes, message: str) -> None:
    with pytest.raises(ImdsError, match=message) as caught:
        parse_credentials(body, "r")
    assert SECRET not in str(caught.value)


def test_a_document_without_code_is_accepted_and_times_are_utc() -> None:
    creds = parse_credentials(doc(Code=None, Expiration="2025-01-01T14:00:00+02:00"), "r")
    assert creds.expiration == datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("what", ["credentials", "token", "role"])
def test_a_huge_answer_is_refused(fake: tuple[FakeImds, str], what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    imds, url = fake
    huge = b" " * (64 * 1024) + b"x"
    if what == "credentials":
        imds.credentials_body = huge
    else:
        original = imds.answer

        def big(method: str, path: str, headers: Any) -> tuple[int, bytes]:
            status, body = original(method, path, headers)
            hit = method == "PUT" if what == "token" else path.endswith("/security-credentials/")
            return (status, huge) if hit else (status, body)

        monkeypatch.setattr(imds, "answer", big)
    with pytest.raises(ImdsError, match="with more than 64 KiB"):
        client(url, Clock()).get()


def test_a_hostile_role_name_is_refused(fake: tuple[FakeImds, str]) -> None:
    imds, url = fake
    imds.role = "../../dynamic/instance-identity/document"
    with pytest.raises(ImdsError, match="no usable role name"):
        client(url, Clock()).get()


class RawServer:
    """Answers every connection with the same bytes (then closes), or drips them."""

    def __init__(self, answer: bytes, *, drip: float = 0.0) -> None:
        self.answer, self.drip = answer, drip
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(WAIT)
                conn.recv(65536)
                if self.drip:
                    for i in range(len(self.answer)):
                        if self.stop.wait(self.drip):
                            return
                        conn.sendall(self.answer[i:i + 1])
                else:
                    conn.sendall(self.answer)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("answer, message", [
    (b"", "RemoteDisconnected"),
    (b"garbage\r\n\r\n", "BadStatusLine"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "7 bytes short of its Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "IncompleteRead"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"10000\r\n" + b"a" * 65536 + b"\r\n10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
     "more than 64 KiB"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n", "got more than 100 headers"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "LineTooLong"),
])
def test_broken_http_is_an_imds_error(answer: bytes, message: str) -> None:
    raw = RawServer(answer)
    try:
        with pytest.raises(ImdsError, match=message):
            ImdsCredentials(f"http://127.0.0.1:{raw.port}", clock=Clock()).get()
    finally:
        raw.close()


def test_a_dripping_server_cannot_hold_a_request_past_its_timeout() -> None:
    raw = RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 100, drip=0.05)
    try:
        with pytest.raises(ImdsError, match=r"did not answer PUT /latest/api/token within 0\.3 s"):
            ImdsCredentials(f"http://127.0.0.1:{raw.port}", clock=Clock(), timeout=0.3).get()
    finally:
        raw.close()


def test_nothing_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImdsError, match=f"cannot PUT /latest/api/token from IMDS at 127.0.0.1:{port}: Connection refused"):
        ImdsCredentials(f"http://127.0.0.1:{port}", clock=Clock()).get()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda head, body: b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + body,
                           st.binary(max_size=120), st.binary(max_size=200))))
def test_arbitrary_answers_raise_only_imds_errors(answer: bytes) -> None:
    raw = RawServer(answer)
    try:
        ImdsCredentials(f"http://127.0.0.1:{raw.port}", clock=Clock(), timeout=1.0).get()
    except ImdsError:
        pass
    finally:
        raw.close()


# -- secrets ------------------------------------------------------------------------------------------


def test_secrets_stay_out_of_repr_logs_and_errors(fake: tuple[FakeImds, str],
                                                  records: list[logging.LogRecord]) -> None:
    imds, url = fake
    clock = Clock()
    c = client(url, clock)
    creds = c.get()
    assert creds.secret_access_key in (SECRET + "1") and creds.token
    assert SECRET not in repr(creds) and creds.token not in repr(creds)
    errors: list[str] = []
    # static stability, a failed advisory refresh, a failed mandatory one, an error message echoing secrets
    imds.expiration = T0 + timedelta(minutes=1)
    c.force_refresh()  # extended to 15 minutes from now
    clock.advance(minutes=2)
    imds.credentials_status = 500
    c.get()
    clock.advance(minutes=4)
    with pytest.raises(ImdsError) as caught:
        c.get()
    errors.append(str(caught.value))
    imds.credentials_status = 200
    imds.credentials_body = json.dumps({"Code": "Failed", "Message": f"bad {SECRET}2 and {creds.token}"}).encode()
    with pytest.raises(ImdsError) as caught:
        c.force_refresh()
    errors.append(str(caught.value))
    assert "Failed: bad *** and ***" in errors[-1]
    logged = [r.getMessage() for r in records]
    assert any("static stability" in m for m in logged) and any("keeping the current set" in m for m in logged)
    for text in logged + errors:
        assert no_secret_in(text), text


# -- what it may import -----------------------------------------------------------------------------


def test_the_client_imports_only_the_stdlib_and_redact() -> None:
    """It is staged into odyn's static binary: no botocore, requests or cryptography."""
    path = REPO / "enclaver_rules/kms/credentials.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    outside = {n for n in names if n.split(".")[0] not in sys.stdlib_module_names | {"__future__", "_typeshed"}}
    assert outside == {"enclaver_rules"}
    code = ("import sys, enclaver_rules.kms.credentials; "
            "print(sorted(m for m in ('botocore', 'boto3', 'requests', 'urllib3', 'cryptography') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_what_the_client_learns_is_masked_in_all_later_output(fake: tuple[FakeImds, str]) -> None:
    _, url = fake
    creds = client(url, Clock()).get()
    assert creds.token
    printed = redact.text(f"key {creds.secret_access_key} and {creds.token} and imds-token-1 were used")
    assert printed == "key *** and *** and *** were used"
