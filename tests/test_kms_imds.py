"""The local IMDSv2 (`enclaver imds serve`): its answers on a fake clock, then the real process checked
against botocore's own IMDS client (a differential check) and against ours, directly and as a proxy."""

from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from botocore.credentials import InstanceMetadataProvider
from botocore.utils import InstanceMetadataFetcher, InstanceMetadataRegionFetcher
from imds_helpers import ACCESS_KEY_ID, ROLE, SECRET_ACCESS_KEY, ForwardProxy, RunningImds, running_imds

from enclaver_rules.cli import main as main_module
from enclaver_rules.kms import imds as imds_module
from enclaver_rules.kms.credentials import ImdsCredentials, ImdsError
from enclaver_rules.kms.imds import Identity, Instance, LocalImds

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
CREDS = f"/latest/meta-data/iam/security-credentials/{ROLE}"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def local(lifetime: float = 3600, clock: Clock | None = None) -> LocalImds:
    return LocalImds(ROLE, Identity(ACCESS_KEY_ID, SECRET_ACCESS_KEY), lifetime=timedelta(seconds=lifetime),
                     instance=Instance("eu-central-1", "444455556666", "i-0abcdef0123456789"),
                     clock=clock or Clock())


def token(imds: LocalImds, ttl: str = "21600") -> str:
    answer = imds.answer("PUT", "/latest/api/token", {TTL: ttl})
    assert answer.status == 200 and (TTL, ttl) in answer.headers
    return answer.body.decode()


def get(imds: LocalImds, path: str, tok: str | None = None) -> tuple[int, str]:
    answer = imds.answer("GET", path, {TOKEN: tok if tok is not None else token(imds)})
    return answer.status, answer.body.decode()


# -- the answers, on a fake clock -------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", ["0", "21601", "", "abc", "-1", "1.5", "9" * 30])
def test_a_token_ttl_outside_1_to_21600_is_a_400(ttl: str) -> None:
    imds = local()
    assert imds.answer("PUT", "/latest/api/token", {TTL: ttl}).status == 400
    assert imds.answer("PUT", "/latest/api/token", {}).status == 400


@pytest.mark.parametrize("ttl", ["1", "21600"])
def test_the_ttl_bounds_are_accepted(ttl: str) -> None:
    assert token(local(), ttl)


def test_gets_without_a_live_token_are_401() -> None:
    clock = Clock()
    imds = local(clock=clock)
    assert imds.answer("GET", CREDS, {}).status == 401  # IMDSv1: refused, as on IMDSv2-only instances
    assert get(imds, CREDS, "not-a-token")[0] == 401
    short = token(imds, "60")
    assert get(imds, CREDS, short)[0] == 200
    clock.now += timedelta(seconds=60)
    assert get(imds, CREDS, short)[0] == 401


def test_the_credentials_document() -> None:
    status, body = get(local(), CREDS)
    doc = json.loads(body)
    assert status == 200 and set(doc) == {"Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey",
                                          "Token", "Expiration"}
    assert doc["Code"] == "Success" and doc["Type"] == "AWS-HMAC"
    assert (doc["AccessKeyId"], doc["SecretAccessKey"]) == (ACCESS_KEY_ID, SECRET_ACCESS_KEY)
    assert doc["LastUpdated"] == "2025-01-01T12:00:00Z" and doc["Expiration"] == "2025-01-01T13:00:00Z"
    assert len(doc["Token"]) >= 100


def test_the_role_listing_and_the_instance() -> None:
    imds = local()
    assert get(imds, "/latest/meta-data/iam/security-credentials/") == (200, ROLE)
    assert get(imds, "/latest/meta-data/iam/security-credentials") == (200, ROLE)
    assert get(imds, "/latest/meta-data/placement/availability-zone") == (200, "eu-central-1a")
    assert get(imds, "/latest/meta-data/placement/availability-zone/") == (200, "eu-central-1a")
    assert get(imds, "/latest/meta-data/placement/region") == (200, "eu-central-1")
    assert get(imds, "/latest/meta-data/instance-id") == (200, "i-0abcdef0123456789")
    doc = json.loads(get(imds, "/latest/dynamic/instance-identity/document")[1])
    assert {k: doc[k] for k in ("region", "accountId", "instanceId", "availabilityZone", "instanceType")} == {
        "region": "eu-central-1", "accountId": "444455556666", "instanceId": "i-0abcdef0123456789",
        "availabilityZone": "eu-central-1a", "instanceType": "m5.xlarge"}


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/latest/meta-data/iam/security-credentials/other-role", 404),
    ("GET", "/latest/meta-data/", 404),
    ("GET", "/", 404),
    ("GET", "/latest/user-data", 404),
    ("PUT", "/latest/api/token/x", 404),
    ("PUT", CREDS, 404),
    ("POST", "/latest/api/token", 405),
    ("DELETE", CREDS, 405),
])
def test_anything_else_is_refused(method: str, path: str, status: int) -> None:
    imds = local()
    assert imds.answer(method, path, {TOKEN: token(imds), TTL: "60"}).status == status


def test_an_absolute_form_target_is_served_like_its_path() -> None:
    imds = local()
    tok = imds.answer("PUT", "http://169.254.169.254/latest/api/token", {TTL: "60"}).body.decode()
    assert get(imds, "http://169.254.169.254/latest/meta-data/instance-id?x=1", tok) == (200, "i-0abcdef0123456789")


def _doc(imds: LocalImds) -> dict[str, str]:
    return json.loads(get(imds, CREDS)[1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("lifetime, rotate_after", [(3600, 1800), (900, 450), (600, 300), (400, 100), (300, 0),
                                                     (60, 0), (1, 0)])
def test_rotation_at_half_the_lifetime_or_5_minutes_before_expiry(lifetime: int, rotate_after: int) -> None:
    clock = Clock()
    imds = local(lifetime, clock)
    assert imds.rotate_after == timedelta(seconds=rotate_after)
    first = _doc(imds)
    if rotate_after:
        clock.now = T0 + timedelta(seconds=rotate_after - 1)
        assert _doc(imds) == first
    clock.now = T0 + timedelta(seconds=rotate_after or 1)
    second = _doc(imds)
    assert second["Token"] != first["Token"] and second["Expiration"] > first["Expiration"]
    assert second["LastUpdated"] == clock.now.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert second["Expiration"] == (clock.now + timedelta(seconds=lifetime)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert second["AccessKeyId"] == first["AccessKeyId"] == ACCESS_KEY_ID


def test_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imds_module, "MAX_TOKENS", 3)
    imds = local()
    tokens = [token(imds, str(60 + i)) for i in range(5)]
    assert [get(imds, "/latest/meta-data/instance-id", t)[0] for t in tokens] == [401, 401, 200, 200, 200]


def test_the_identity_secret_stays_out_of_repr_and_errors() -> None:
    assert SECRET_ACCESS_KEY not in repr(Identity.parse(f"{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}"))
    assert Identity.parse("AKID:a:b").secret_access_key == "a:b"
    for bad in (SECRET_ACCESS_KEY, f"bad/akid:{SECRET_ACCESS_KEY}", f"{ACCESS_KEY_ID}:", f":{SECRET_ACCESS_KEY}"):
        with pytest.raises(ValueError) as caught:
            Identity.parse(bad)
        assert SECRET_ACCESS_KEY not in str(caught.value)


# -- the process, over HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[RunningImds]:
    with running_imds(region="ap-southeast-2") as running:
        yield running


def test_botocore_gets_the_credentials_and_the_region(server: RunningImds) -> None:
    """The differential check: botocore's own IMDS client, as every AWS SDK for Python uses it."""
    fetcher = InstanceMetadataFetcher(timeout=5, num_attempts=1, base_url=server.url)
    creds = InstanceMetadataProvider(iam_role_fetcher=fetcher).load()
    assert creds is not None and creds.method == "iam-role"
    frozen = creds.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key) == (ACCESS_KEY_ID, SECRET_ACCESS_KEY) and len(frozen.token) >= 100
    assert InstanceMetadataRegionFetcher(timeout=5, num_attempts=1, base_url=server.url).retrieve_region() == \
        "ap-southeast-2"


def test_our_client_agrees_with_botocore(server: RunningImds) -> None:
    ours = ImdsCredentials(server.url, timeout=5).get()
    fetcher = InstanceMetadataFetcher(timeout=5, num_attempts=1, base_url=server.url)
    theirs = fetcher.retrieve_iam_role_credentials()
    assert (ours.access_key_id, ours.secret_access_key, ours.token) == (
        theirs["access_key"], theirs["secret_key"], theirs["token"])
    assert ours.expiration is not None
    assert ours.expiration.strftime("%Y-%m-%dT%H:%M:%SZ") == theirs["expiry_time"]
    assert ImdsCredentials(server.url, timeout=5).region() == "ap-southeast-2"


def test_our_client_through_a_forward_proxy(server: RunningImds) -> None:
    proxy = ForwardProxy(("127.0.0.1", server.port))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        client = ImdsCredentials(proxy=("127.0.0.1", proxy.server_address[1]), timeout=5)
        assert client.get().access_key_id == ACCESS_KEY_ID and client.region() == "ap-southeast-2"
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert [line for line, _ in proxy.seen][:2] == [
        "PUT http://169.254.169.254/latest/api/token HTTP/1.1",
        "GET http://169.254.169.254/latest/meta-data/iam/security-credentials/ HTTP/1.1"]


def test_our_client_with_the_server_as_its_proxy(server: RunningImds) -> None:
    """The server takes absolute-form targets, so a test can point a client's proxy straight at it."""
    client = ImdsCredentials(proxy=("127.0.0.1", server.port), timeout=5)
    assert client.get().secret_access_key == SECRET_ACCESS_KEY


def _raw(server: RunningImds, method: str, path: str, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, headers=headers)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


def test_over_http_imdsv1_and_bad_ttls_are_refused(server: RunningImds) -> None:
    assert _raw(server, "GET", CREDS, {}) == 401
    assert _raw(server, "PUT", "/latest/api/token", {TTL: "0"}) == 400
    assert _raw(server, "PUT", "/latest/api/token", {TTL: "21601"}) == 400
    assert _raw(server, "PUT", "/latest/api/token", {}) == 400


def test_over_http_a_put_body_too_large_to_read_is_refused(server: RunningImds) -> None:
    assert _raw(server, "PUT", "/latest/api/token", {TTL: "60", "Content-Length": "100000"}) == 400


def test_our_client_errors_name_the_missing_role(server: RunningImds) -> None:
    with pytest.raises(ImdsError, match="404 Not Found for GET /latest/meta-data/iam/security-credentials/"):
        ImdsCredentials(server.url, timeout=5)._get(CREDS + "x")


def test_a_short_lifetime_rotates_through_the_process() -> None:
    with running_imds(lifetime=2) as running:
        client = ImdsCredentials(running.url, timeout=5)
        first = client.get()
        deadline = time.monotonic() + 30
        while (second := client.force_refresh()).expiration == first.expiration and time.monotonic() < deadline:
            time.sleep(0.2)  # Expiration has whole seconds: wait for the next one
    assert second.token != first.token
    assert first.expiration is not None and second.expiration is not None and second.expiration > first.expiration


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_it_cleanly_and_nothing_printed_holds_the_secret(stop: signal.Signals) -> None:
    process = subprocess.Popen([sys.executable, "-m", "enclaver_rules.cli", "imds", "serve", "--port", "0",
                                "--role", ROLE, "--identity", f"{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}", "-vv"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert ready.startswith("serving IMDSv2 at http://127.0.0.1:") and ACCESS_KEY_ID in ready
        port = int(ready.split("http://127.0.0.1:", 1)[1].split(":", 1)[0])
        client = ImdsCredentials(f"http://127.0.0.1:{port}", timeout=5)
        assert client.get().secret_access_key == SECRET_ACCESS_KEY
        process.send_signal(stop)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped" in err
    assert SECRET_ACCESS_KEY not in ready + out + err


# -- the command line, in process ------------------------------------------------------------------------


def _main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main_module.main(["imds", "serve", *args], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("args, field", [
    (["--identity", SECRET_ACCESS_KEY], "--identity"),
    (["--identity", f"AKIA/BAD:{SECRET_ACCESS_KEY}"], "--identity"),
    (["--role", "no/slashes"], "--role"),
    (["--lifetime", "0"], "--lifetime"),
    (["--lifetime", "43201"], "--lifetime"),
    (["--region", "Mars"], "--region"),
    (["--account", "12345"], "--account"),
    (["--instance-id", "i-xyz"], "--instance-id"),
    (["--port", "70000"], "--port"),
])
def test_bad_flags_are_invalid_input_and_never_echo_the_secret(args: list[str], field: str) -> None:
    base = {"--port": "0", "--role": ROLE, "--identity": f"{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}"}
    flags = dict(base, **dict(zip(args[::2], args[1::2], strict=True)))
    code, out, err = _main(*[x for pair in flags.items() for x in pair])
    assert code == 2 and field in err, err
    assert SECRET_ACCESS_KEY not in out + err


def test_a_port_in_use_is_a_failure() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = _main("--port", str(port), "--role", ROLE, "--identity", f"{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}")
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in err and SECRET_ACCESS_KEY not in out + err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = _main("--help")
    out = capsys.readouterr().out  # argparse prints help on sys.stdout
    assert code == 0 and "exit codes:" in out and "--identity" in out and "--json" in out
