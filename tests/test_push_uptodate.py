"""`push:<name>` is up to date only when the registry still has what `pushed.json` says was pushed:
asked with HEAD requests alone (no body, no write), a short timeout, no retries; a registry that
cannot answer means "not up to date", so the push runs and reports the real error."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from enclaver_rules.oci.digest import Digest
from enclaver_rules.rules import push
from enclaver_rules.rules.push import pushed_present

IMAGE = Digest.of(b"release image manifest")
MEASURED = Digest.of(b"measurements referrer")
POLICY = Digest.of(b"kms policy referrer")


@dataclass
class FakeRegistry:
    """Answers HEAD of manifests from `tags` and `manifests`; records every request."""

    address: str = ""
    tags: dict[str, Digest] = field(default_factory=dict)
    manifests: set[Digest] = field(default_factory=set)
    status: int | None = None  # answer every request with this status instead
    seen: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    state = FakeRegistry(tags={"release": IMAGE}, manifests={IMAGE, MEASURED, POLICY})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            state.seen.append((self.command, self.path))
            selector = self.path.rsplit("/manifests/", 1)[-1]
            found = state.tags.get(selector) or next((d for d in state.manifests if str(d) == selector), None)
            if self.command != "HEAD":
                self.send_response(405)
            elif state.status:
                self.send_response(state.status)
            elif found and "/manifests/" in self.path:
                self.send_response(200)
                self.send_header("Docker-Content-Digest", str(found))
                self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            else:
                self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = do_PUT = do_POST = do_DELETE = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def write_records(cache: Path, address: str, *, pushed: Digest = IMAGE) -> None:
    entry = cache / "out" / "alpha" / "0123abcd"
    entry.mkdir(parents=True)
    (cache / "out" / "alpha" / "latest").symlink_to("0123abcd")
    target = f"{address}/alpha:release"
    (entry / "build.json").write_text(json.dumps({"target": target, "release_image": str(IMAGE)}))
    (entry / "pushed.json").write_text(json.dumps({
        "target": target, "digest": str(pushed),
        "referrers": [{"artifactType": "m", "digest": str(MEASURED), "discovery": "tag", "tag": "x"},
                      {"artifactType": "p", "digest": str(POLICY), "discovery": "tag", "tag": "x"}]}))


def test_up_to_date_when_the_registry_has_the_image_and_its_referrers(fake: FakeRegistry, tmp_path: Path) -> None:
    write_records(tmp_path, fake.address)
    assert pushed_present(str(tmp_path), "alpha")
    assert fake.seen == [("HEAD", "/v2/alpha/manifests/release"), ("HEAD", f"/v2/alpha/manifests/{MEASURED}"),
                         ("HEAD", f"/v2/alpha/manifests/{POLICY}")]  # HEADs only: nothing written, no bodies


def test_not_up_to_date_when_the_registry_lost_the_image(fake: FakeRegistry, tmp_path: Path) -> None:
    write_records(tmp_path, fake.address)
    fake.tags.clear()
    fake.manifests.discard(IMAGE)
    assert not pushed_present(str(tmp_path), "alpha")
    assert fake.seen == [("HEAD", "/v2/alpha/manifests/release")]  # one request settles it


def test_not_up_to_date_when_the_tag_names_another_image(fake: FakeRegistry, tmp_path: Path) -> None:
    write_records(tmp_path, fake.address)
    fake.tags["release"] = Digest.of(b"someone else's push")
    assert not pushed_present(str(tmp_path), "alpha")


def test_not_up_to_date_when_a_referrer_is_gone(fake: FakeRegistry, tmp_path: Path) -> None:
    write_records(tmp_path, fake.address)
    fake.manifests.discard(POLICY)
    assert not pushed_present(str(tmp_path), "alpha")


def test_not_up_to_date_when_the_registry_fails(fake: FakeRegistry, tmp_path: Path) -> None:
    write_records(tmp_path, fake.address)
    fake.status = 503
    assert not pushed_present(str(tmp_path), "alpha")
    assert len(fake.seen) == 1  # no retries: an up-to-date check stays cheap


def test_no_request_when_the_local_records_already_disagree(fake: FakeRegistry, tmp_path: Path) -> None:
    write_records(tmp_path, fake.address, pushed=Digest.of(b"an older build"))
    assert not pushed_present(str(tmp_path), "alpha")
    assert not pushed_present(str(tmp_path / "nothing"), "alpha")
    assert fake.seen == []


def test_an_unreachable_registry_is_not_up_to_date(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    write_records(tmp_path, f"127.0.0.1:{port}")
    assert not pushed_present(str(tmp_path), "alpha")


def test_a_registry_that_does_not_answer_costs_the_short_timeout_once(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(push, "UPTODATE_TIMEOUT", (0.5, 0.5))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connects, never answers
        write_records(tmp_path, f"127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        assert not pushed_present(str(tmp_path), "alpha")
        assert time.monotonic() - started < 2.5  # one read timeout, not retries at the push's patient ones
