"""The local KMS over HTTP: AWS JSON 1.1 on `POST /`, SigV4 checked, `LocalKms` answering.

A `ThreadingHTTPServer` (HTTP/1.1, keep-alive, as the SDKs expect) made to survive hostile clients:
at most MAX_CONNECTIONS connections at once (more are closed at accept), every socket operation bounded
by IO_TIMEOUT (a client that stalls is dropped), a body read only when its Content-Length is given and
at most MAX_BODY (the largest KMS request: a 256 KiB attestation document as base64, or a 128 KiB
policy), header lines and counts bounded by `http.client`'s limits, and any bug in an action
answered as KMSInternalException (500) with the traceback in the log — one request fails, the server
stays. Error answers are `{"__type", "message"}` (`wire.error_body`) with the model's status, else 400.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from enclaver_rules.kms import shapes, sigv4
from enclaver_rules.kms.actions import Caller, LocalKms
from enclaver_rules.kms.sigv4 import Identity
from enclaver_rules.kms.wire import CONTENT_TYPE, TARGET_HEADER, ServiceError, action_of, error_body, loads

log = logging.getLogger("enclaver.kms")

MAX_BODY = 1 << 20
MAX_CONNECTIONS = 256  # SDK clients keep idle connections (botocore: up to 10 each) for reuse
IO_TIMEOUT = 30.0  # seconds per socket operation; also how long an idle keep-alive connection is kept
ACCEPTED_TYPES = (CONTENT_TYPE, "application/x-amz-json-1.0", "application/json")


class KmsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], kms: LocalKms, identities: Mapping[str, Identity],
                 clock: Callable[[], float] = time.time) -> None:
        self.kms = kms
        self.identities = dict(identities)
        self.clock = clock
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # full: close at once rather than queue a thread
            log.warning("refused a connection from %s: %d connections open", client_address, MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: KmsHttpServer
    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT
    # an answer leaves in one write (head and body buffered, flushed after each request), with no
    # delayed-ACK stall between its pieces and no separate segment a reset could cut off
    disable_nagle_algorithm = True
    wbufsize = 64 << 10

    def version_string(self) -> str:
        return "enclaver-local-kms"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_POST(self) -> None:
        request_id = str(uuid.uuid4())
        try:
            body = self._body()
            if self.path != "/":
                raise ServiceError("UnknownOperationException", f"KMS answers POST /, not {self.path[:80]!r}", 404)
            identity = sigv4.verify(method="POST", path=self.path, headers=list(self.headers.items()), body=body,
                                    identities=self.server.identities, region=self.server.kms.region,
                                    now=datetime.fromtimestamp(self.server.clock(), UTC))
            try:
                action = action_of(self.headers.get(TARGET_HEADER, ""))
            except ValueError as e:
                raise ServiceError("UnknownOperationException", str(e)) from None
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type not in ACCEPTED_TYPES:
                raise ServiceError("SerializationException", f"Content-Type must be {CONTENT_TYPE}, not "
                                                             f"{content_type[:80]!r}")
            try:
                params = loads(body) if body.strip() else {}
            except (ValueError, RecursionError) as e:
                raise ServiceError("SerializationException", f"the body is not JSON: {str(e)[:200]}") from None
            result = self.server.kms.call(action, params, Caller(identity.principal, identity.access_key))
            log.info("%s %s by %s: ok", request_id, action, identity.principal)
            self._send(200, json.dumps(result, separators=(",", ":")).encode(), request_id)
        except ServiceError as e:
            log.info("%s refused: %s", request_id, e)
            status = e.status if e.status != 400 else shapes.error_status(e.code)
            self._send(status, e.body(), request_id)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # one request fails with a 500; the server and other requests go on
            log.exception("%s: the local KMS failed on a request", request_id)
            self._send(500, error_body("KMSInternalException", "the local KMS failed on this request (see its log)"),
                       request_id)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ServiceError("SerializationException", "send the body with a Content-Length, not chunked", 411)
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            raise ServiceError("SerializationException", "Content-Length is required", 411)
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the body is never read: the connection cannot be reused
            raise ServiceError("SerializationException", f"Content-Length {raw[:20]!r} is not 0..{MAX_BODY}", 413)
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise ConnectionError("the client closed the connection mid-body")
        return body

    def _refuse_method(self) -> None:
        self.close_connection = True
        self._send(405, error_body("UnknownOperationException", f"KMS answers POST /, not {self.command}"),
                   str(uuid.uuid4()))

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse_method

    def _send(self, status: int, body: bytes, request_id: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-amzn-RequestId", request_id)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (ConnectionError, TimeoutError):
            self.close_connection = True


def serve(kms: LocalKms, identities: Mapping[str, Identity], host: str, port: int) -> KmsHttpServer:
    """A server bound and listening on (host, port) — connections are accepted (queued) from here on;
    run `serve_forever()` to answer them, `shutdown()` from another thread to stop."""
    return KmsHttpServer((host, port), kms, identities)
