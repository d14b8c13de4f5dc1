"""The registry client hands its credentials only to the registry itself: an upload `Location` that names
another host (a storage CDN, or a hostile registry collecting tokens) gets the PUT without
`Authorization`, while the registry still gets it up front. Two local HTTP servers, no Docker."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.registry import Registry

BASIC = base64.b64encode(b"ci-bot:s3cret-pass").decode()


def _server(handler: type[http.server.BaseHTTPRequestHandler], host: str) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def servers() -> Iterator[tuple[str, list[tuple[str, str | None]], list[tuple[str, str | None]]]]:
    seen_registry: list[tuple[str, str | None]] = []
    seen_elsewhere: list[tuple[str, str | None]] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_PUT(self) -> None:
            seen_elsewhere.append((self.path, self.headers.get("Authorization")))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ok = str(Digest.of(body)) == parse_qs(urlsplit(self.path).query)["digest"][0]
            self.send_response(201 if ok else 400)
            self.send_header("Content-Length", "0")
            self.end_headers()

    other = _server(Elsewhere, "127.0.0.2")

    class Registry401(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _authorized(self) -> bool:
            seen_registry.append((f"{self.command} {self.path}", self.headers.get("Authorization")))
            if self.headers.get("Authorization") != f"Basic {BASIC}":
                self._answer(401, {"WWW-Authenticate": 'Basic realm="test"'})
                return False
            return True

        def do_HEAD(self) -> None:
            if self._authorized():
                self._answer(404, {})

        def do_POST(self) -> None:
            if self._authorized():
                host, port = other.server_address[:2]
                self._answer(202, {"Location": f"http://{host}:{port}/upload/1?state=x"})

    registry = _server(Registry401, "127.0.0.1")
    try:
        yield f"127.0.0.1:{registry.server_address[1]}", seen_registry, seen_elsewhere
    finally:
        registry.shutdown()
        other.shutdown()


def test_an_upload_location_on_another_host_gets_no_credentials(servers) -> None:  # type: ignore[no-untyped-def]
    address, seen_registry, seen_elsewhere = servers
    blob = b"layer bytes" * 100
    descriptor = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    client = Registry(address, credentials=lambda host: BASIC)
    result = client.push_blob("team/app", descriptor, lambda: io.BytesIO(blob))
    assert result.how == "uploaded"
    # the registry asked for and got the credentials …
    assert any(auth == f"Basic {BASIC}" for _, auth in seen_registry)
    # … the other host got the blob and never the credentials
    assert len(seen_elsewhere) == 1 and seen_elsewhere[0][0].startswith("/upload/1?state=x&digest=sha256:")
    assert seen_elsewhere[0][1] is None
