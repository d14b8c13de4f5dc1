"""odyn's KMS proxy: boto3 as the app, odyn's egress stack in front of a KMS on 127.0.0.1 that checks
the Recipient and the SigV4 signature and seals its answers (tests/kms_proxy_fakes.py); the
rewriting (`kms_rewrite`) on its own; the recipient key's rotation on a fake clock."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import subprocess
import sys
import tarfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization

from enclaver_rules.attestation import verify
from enclaver_rules.attestation.nsm_messages import NsmError
from enclaver_rules.kms import cms
from enclaver_rules.kms.credentials import ImdsCredentials
from enclaver_rules.kms.imds import Identity, LocalImds
from enclaver_rules.kms.imds import serve as serve_imds
from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.manifest import KmsEndpoint
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import load_stored
from enclaver_rules.odyn_image.image import DEFAULT_TAG, ODYN_PATH
from enclaver_rules.policy import EgressPolicy
from enclaver_rules.policy import kms as kms_policy
from enclaver_rules.runtime.egress_host import HostEgress
from enclaver_rules.runtime.sim_nsm import CertificateAuthority, SimulatedNsm
from enclaver_rules.runtime.sim_nsm import serve as serve_nsm
from kms_helpers import ADMIN, IDENTITIES, PARENT, local_kms
from kms_proxy_fakes import (
    APP,
    INSTANCE,
    PLAINTEXTS,
    ROTATED,
    FakeCredentials,
    FakeKms,
    FakeNsm,
    egress_stack,
    tls_pair,
)
from odyn import kms_proxy, kms_rewrite
from odyn.http_head import parse_head
from odyn.kms_proxy import KeyRing, KmsProxy, RecipientKey, new_key
from odyn.kms_rewrite import ProxyError
from odyn.nsm import NsmClient
from odyn.supervisor import EXIT_FATAL, Supervisor
from services import free_port

LIMIT = 30.0
REGION = "us-east-1"


@dataclass
class Stack:
    proxy: KmsProxy
    port: int
    kms: FakeKms
    nsm: FakeNsm
    credentials: FakeCredentials
    lines: list[str] = field(default_factory=list)

    def client(self) -> Any:
        session = boto3.session.Session(aws_access_key_id=APP.access_key_id, aws_secret_access_key=APP.secret_access_key,
                                        region_name=REGION)
        return session.client("kms", endpoint_url=f"http://127.0.0.1:{self.port}",
                              config=Config(retries={"total_max_attempts": 1}, read_timeout=LIMIT, connect_timeout=5))

    async def call(self, operation: str, **params: Any) -> dict[str, Any]:
        client = self.client()
        return await asyncio.to_thread(getattr(client, operation), **params)  # type: ignore[no-any-return]

    async def fails(self, operation: str, **params: Any) -> ClientError:
        with pytest.raises(ClientError) as caught:
            await self.call(operation, **params)
        return caught.value

    async def raw(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            answer = await asyncio.wait_for(reader.read(), LIMIT)
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split(" ")[1]), headers, body

    async def still_serves(self) -> None:
        mode, self.kms.mode = self.kms.mode, "ok"
        try:
            answer = await self.call("decrypt", CiphertextBlob=b"blob")
        finally:
            self.kms.mode = mode
        assert answer["Plaintext"] == PLAINTEXTS["Decrypt"]


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *, allow: tuple[str, ...] = ("127.0.0.1",), endpoint: str | None = None,
                  kms: FakeKms | None = None, nsm: FakeNsm | None = None,
                  credentials: FakeCredentials | Callable[[int], Any] | None = None,
                  tls: bool = False, **options: Any) -> AsyncIterator[Stack]:
    server_tls = client_tls = None
    if tls:
        server_tls, client_tls = tls_pair(tmp_path)
    kms = kms or FakeKms()
    kms.ssl_context = server_tls
    await kms.start()
    egress_port, servers = await egress_stack(tmp_path, list(allow))
    where = KmsEndpoint.parse(endpoint or (f"127.0.0.1:{kms.port}" if tls else f"http://127.0.0.1:{kms.port}"))
    lines: list[str] = []
    if callable(credentials):  # made with the egress proxy's port
        credentials = credentials(egress_port)
    proxy = KmsProxy(nsm or FakeNsm(), credentials or FakeCredentials(INSTANCE), lambda region: where,
                     ("127.0.0.1", egress_port), ssl_context=client_tls, log=lines.append, **options)
    proxy.start()
    server = await kms_proxy.serve(proxy, 0)
    stack = Stack(proxy, server.sockets[0].getsockname()[1], kms, proxy.attester, proxy.credentials, lines)  # type: ignore[arg-type]
    try:
        yield stack
        assert not [line for line in lines if "internal error" in line], lines
    finally:
        server.close()
        proxy.close()
        kms.close()
        for s in servers:
            s.close()


def run(tmp_path: Path, body: Callable[[Stack], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        async with running(tmp_path, **options) as stack:
            await asyncio.wait_for(body(stack), 90)

    asyncio.run(main())


def _document_key(stack: Stack, index: int = -1) -> bytes:
    recipient = stack.kms.seen[index].json()["Recipient"]
    return base64.b64decode(recipient["AttestationDocument"])


# -- the five Recipient actions ---------------------------------------------------------------------


def test_each_recipient_action_gets_its_plaintext_in_its_own_field(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        decrypted = await s.call("decrypt", CiphertextBlob=b"blob", KeyId="alias/k")
        assert decrypted["Plaintext"] == PLAINTEXTS["Decrypt"] and "CiphertextForRecipient" not in decrypted
        assert decrypted["KeyId"] == "arn:aws:kms:us-east-1:1:key/k"
        data_key = await s.call("generate_data_key", KeyId="alias/k", KeySpec="AES_256")
        assert data_key["Plaintext"] == PLAINTEXTS["GenerateDataKey"]
        assert data_key["CiphertextBlob"] == b"wrapped data key"
        pair = await s.call("generate_data_key_pair", KeyId="alias/k", KeyPairSpec="RSA_2048")
        assert pair["PrivateKeyPlaintext"] == PLAINTEXTS["GenerateDataKeyPair"]  # upstream 0.5 wrote Plaintext
        assert pair["PublicKey"] == b"public" and "Plaintext" not in pair
        random = await s.call("generate_random", NumberOfBytes=7)
        assert random["Plaintext"] == b"\x07" * 7
        secret = await s.call("derive_shared_secret", KeyId="alias/k", KeyAgreementAlgorithm="ECDH",
                              PublicKey=b"their public key")
        assert secret["SharedSecret"] == PLAINTEXTS["DeriveSharedSecret"] and "Plaintext" not in secret
        assert [x.action for x in s.kms.seen] == ["Decrypt", "GenerateDataKey", "GenerateDataKeyPair",
                                                  "GenerateRandom", "DeriveSharedSecret"]
        # each call carried a fresh document over the proxy's one key, and nothing else of the NSM's
        spki = s.proxy.keys.current.spki  # type: ignore[union-attr]
        assert s.nsm.calls == [(None, None, spki)] * 5
        assert all(_document_key(s, i) == b"fake-attestation-document:" + spki for i in range(5))
        public = serialization.load_der_public_key(spki)
        assert public.key_size == 2048  # type: ignore[union-attr]
        # the rest of the request is the app's
        assert s.kms.seen[0].json()["CiphertextBlob"] == base64.b64encode(b"blob").decode()
        assert s.kms.seen[0].json()["KeyId"] == "alias/k"

    run(tmp_path, body)


def test_kms_sees_a_valid_signature_by_the_instance_credentials_never_the_apps(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        await s.call("decrypt", CiphertextBlob=b"blob")
        await s.call("encrypt", KeyId="alias/k", Plaintext=b"hello")
        for seen in s.kms.seen:
            assert seen.access_key == INSTANCE.access_key_id and seen.signature_problem == ""
            assert seen.headers["x-amz-security-token"] == INSTANCE.token
            assert f"/{REGION}/kms/aws4_request" in seen.headers["authorization"]
            assert seen.headers["content-type"] == "application/x-amz-json-1.1"
            assert seen.headers["host"] == f"127.0.0.1:{s.kms.port}"
            assert seen.headers["user-agent"].endswith("odyn-kms-proxy")
            assert APP.access_key_id not in json.dumps(seen.headers)

    run(tmp_path, body)


def test_the_fake_kms_refuses_a_forged_signature() -> None:
    """The signature check the tests rely on can fail."""
    from kms_proxy_fakes import verify_sigv4

    headers = {"host": "kms.test", "x-amz-date": "20260101T000000Z", "x-amz-target": "TrentService.Decrypt",
               "content-type": "application/x-amz-json-1.1", "x-amz-security-token": INSTANCE.token or "",
               "authorization": f"AWS4-HMAC-SHA256 Credential={INSTANCE.access_key_id}/20260101/us-east-1/kms/"
                                "aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;"
                                "x-amz-target, Signature=" + "0" * 64}
    assert verify_sigv4("POST", "/", headers, b"{}", {INSTANCE.access_key_id: INSTANCE.secret_access_key}) == (
        INSTANCE.access_key_id, "signature does not match")


def test_other_actions_pass_through_signed_again_and_without_recipient(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        sent: list[bytes] = []
        client = s.client()
        client.meta.events.register("before-send.kms.*", lambda request, **_: sent.append(request.body))
        encrypted = await asyncio.to_thread(client.encrypt, KeyId="alias/k", Plaintext=b"hello",
                                            EncryptionContext={"b": "2", "a": "1"})
        assert encrypted["CiphertextBlob"] == b"cipher:hello"
        [seen] = s.kms.seen
        assert seen.action == "Encrypt" and "Recipient" not in seen.json()
        assert seen.body == sent[0]  # byte for byte: not parsed, not re-serialised
        assert s.nsm.calls == []
        await s.call("describe_key", KeyId="alias/k")
        assert s.kms.seen[-1].action == "DescribeKey" and s.kms.seen[-1].signature_problem == ""

    run(tmp_path, body)


def test_a_recipient_the_app_sent_is_replaced(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        answer = await s.call("decrypt", CiphertextBlob=b"blob",
                              Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                                         "AttestationDocument": b"a document over the app's own key"})
        assert answer["Plaintext"] == PLAINTEXTS["Decrypt"]  # the app cannot redirect the seal to its own key
        recipient = s.kms.seen[0].json()["Recipient"]
        assert recipient == {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                             "AttestationDocument": base64.b64encode(_document_key(s)).decode()}
        assert _document_key(s).endswith(s.proxy.keys.current.spki)  # type: ignore[union-attr]

    run(tmp_path, body)


# -- KMS's answers --------------------------------------------------------------------------------------


def test_errors_from_kms_pass_through_as_they_are(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        error = await s.fails("decrypt", CiphertextBlob=b"blob")
        assert error.response["Error"] == {"Code": "AccessDeniedException", "Message": "not for you"}
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert error.response["ResponseMetadata"]["RequestId"] == "req-1"
        status, headers, raw = await s.raw(_request(b'{"CiphertextBlob":"AQI="}'))
        assert status == 400 and raw == b'{"__type":"AccessDeniedException","message":"not for you"}'
        assert headers["content-length"] == str(len(raw)) and "x-amzn-extra" not in headers
        assert s.lines == []  # KMS's refusals are the app's business, not odyn's log

    run(tmp_path, body, kms=FakeKms(mode="denied"))


@pytest.mark.parametrize(("mode", "words"), [
    ("no-cfr", "KMS answered Decrypt without CiphertextForRecipient"),
    ("garbage-cms", "does not open with the proxy's key"),
    ("bad-json", "KMS's 200 answer to Decrypt is not usable JSON"),
    ("big", "answered with more than 1048576 bytes"),
])
def test_a_bad_answer_from_kms_is_a_clear_error_and_odyn_serves_on(tmp_path: Path, mode: str, words: str) -> None:
    async def body(s: Stack) -> None:
        error = await s.fails("decrypt", CiphertextBlob=b"blob")
        assert error.response["Error"]["Code"] == "KMSProxyError"
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 502
        assert error.response["Error"]["Message"].startswith("odyn's KMS proxy: ")
        assert words in error.response["Error"]["Message"]
        assert len(s.lines) == 1 and s.lines[0].startswith("odyn: KMS proxy: ") and words in s.lines[0]
        await s.still_serves()

    run(tmp_path, body, kms=FakeKms(mode=mode))


def test_expired_credentials_are_refreshed_once_and_the_call_retried(tmp_path: Path) -> None:
    credentials = FakeCredentials(INSTANCE, ROTATED)

    async def body(s: Stack) -> None:
        answer = await s.call("decrypt", CiphertextBlob=b"blob")
        assert answer["Plaintext"] == PLAINTEXTS["Decrypt"]
        assert [x.access_key for x in s.kms.seen] == [INSTANCE.access_key_id, ROTATED.access_key_id]
        assert credentials.refreshes == 1
        assert s.kms.seen[0].json()["Recipient"] == s.kms.seen[1].json()["Recipient"]  # the same document
        assert s.lines == ["odyn: KMS proxy: KMS refused the instance's credentials (ExpiredTokenException); "
                           "fetched new ones from IMDS and retried once"]
        s.kms.valid = {}  # now nothing is accepted: one refresh, one retry, then KMS's answer
        error = await s.fails("encrypt", KeyId="k", Plaintext=b"x")
        assert error.response["Error"]["Code"] == "ExpiredTokenException"
        assert credentials.refreshes == 2 and len(s.kms.seen) == 4

    run(tmp_path, body, credentials=credentials, kms=FakeKms(valid={ROTATED.access_key_id: ROTATED}))


@contextlib.contextmanager
def local_imds(clock: Callable[[], datetime]) -> Iterator[tuple[LocalImds, str]]:
    """`enclaver imds serve`'s server, in a thread, on a clock the test moves."""
    imds = LocalImds("enclave-role", Identity(INSTANCE.access_key_id, INSTANCE.secret_access_key), clock=clock)
    server = serve_imds(imds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield imds, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class WallClock:
    """Now, plus however far the test has moved it."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.ahead


def test_credentials_from_imds_through_egress_are_refreshed_before_they_expire(tmp_path: Path) -> None:
    """The real IMDSv2 client and the local IMDS, both on the test's clock; KMS takes only the token
    IMDS currently hands out."""
    clock = WallClock()
    with local_imds(clock) as (imds, url):
        kms = FakeKms(accept=lambda akid, token: token == imds.credentials()["Token"])

        async def body(s: Stack) -> None:
            await s.call("decrypt", CiphertextBlob=b"blob")
            clock.ahead = timedelta(minutes=51)  # under 10 of the set's 60 minutes left: it must be renewed first
            await s.call("decrypt", CiphertextBlob=b"blob")
            first, second = (seen.headers["x-amz-security-token"] for seen in s.kms.seen)
            assert first != second and [seen.access_key for seen in s.kms.seen] == [INSTANCE.access_key_id] * 2
            assert s.lines == []  # renewed before use: KMS never refused a set

        run(tmp_path, body, kms=kms, credentials=lambda port: ImdsCredentials(url, proxy=("127.0.0.1", port),
                                                                               clock=clock))


def test_credentials_imds_rotated_early_are_refreshed_when_kms_refuses_them(tmp_path: Path) -> None:
    clock = WallClock()
    with local_imds(clock) as (imds, url):
        kms = FakeKms(accept=lambda akid, token: token == imds.credentials()["Token"])

        async def body(s: Stack) -> None:
            await s.call("decrypt", CiphertextBlob=b"blob")
            clock.ahead = timedelta(minutes=31)  # IMDS has a new set; the client, 29 minutes from expiry, has no reason to ask
            answer = await s.call("generate_data_key", KeyId="k", KeySpec="AES_256")
            assert answer["Plaintext"] == PLAINTEXTS["GenerateDataKey"]
            tokens = [seen.headers["x-amz-security-token"] for seen in s.kms.seen]
            assert tokens[0] == tokens[1] != tokens[2] and len(tokens) == 3
            assert s.lines == ["odyn: KMS proxy: KMS refused the instance's credentials (ExpiredTokenException); "
                               "fetched new ones from IMDS and retried once"]

        run(tmp_path, body, kms=kms, credentials=lambda port: ImdsCredentials(url, proxy=("127.0.0.1", port),
                                                                               clock=clock))


def test_imds_the_egress_policy_denies_is_503_naming_it(tmp_path: Path) -> None:
    with local_imds(WallClock()) as (_, url):
        async def body(s: Stack) -> None:
            error = await s.fails("decrypt", CiphertextBlob=b"blob")
            assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 503
            assert "no AWS credentials from the instance metadata service" in error.response["Error"]["Message"]
            assert s.kms.seen == [] and len(s.lines) == 1

        imds_at = url.replace("127.0.0.1", "localhost")  # allowed is 127.0.0.1, not the name
        run(tmp_path, body, credentials=lambda port: ImdsCredentials(imds_at, proxy=("127.0.0.1", port)))


def test_no_credentials_from_imds_is_503(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        error = await s.fails("generate_random", NumberOfBytes=8)
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert "no AWS credentials from the instance metadata service: IMDS is down" in error.response["Error"]["Message"]
        assert s.kms.seen == []

    run(tmp_path, body, credentials=FakeCredentials(INSTANCE, error=OSError("IMDS is down")))


def test_the_nsm_failing_is_502_naming_it(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        error = await s.fails("decrypt", CiphertextBlob=b"blob")
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 502
        assert error.response["Error"]["Message"] == ("odyn's KMS proxy: no attestation document for Decrypt: the NSM "
                                                      "failed: InvalidArgument")
        assert s.kms.seen == []
        await s.call("encrypt", KeyId="k", Plaintext=b"x")  # no Recipient, no NSM: still served

    run(tmp_path, body, nsm=FakeNsm(NsmError("InvalidArgument")))


def test_a_kms_host_the_egress_policy_denies_gets_403_naming_the_policy(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        error = await s.fails("decrypt", CiphertextBlob=b"blob")
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        message = error.response["Error"]["Message"]
        assert message.startswith("odyn's KMS proxy: odyn's egress proxy refused (403): kms.denied.test:4599 is denied "
                                  "by the enclave's egress policy") and message.endswith("(add it to egress.allow)")
        assert message.count("kms.denied.test:4599") == 1
        assert s.lines == [f"odyn: KMS proxy: {message.removeprefix('odyn' + chr(39) + 's KMS proxy: ')}"]
        assert s.kms.seen == []

    run(tmp_path, body, endpoint="http://kms.denied.test:4599")


def test_an_https_endpoint_goes_through_connect_and_tls_with_its_name(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        answer = await s.call("generate_data_key", KeyId="k", NumberOfBytes=32)
        assert answer["Plaintext"] == PLAINTEXTS["GenerateDataKey"]
        assert s.kms.seen[0].headers["host"] == f"127.0.0.1:{s.kms.port}" and s.kms.seen[0].signature_problem == ""

    run(tmp_path, body, tls=True)


def test_an_endpoint_whose_certificate_does_not_verify_is_502(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        s.proxy.ssl_context = kms_proxy.default_ssl_context()  # certifi's roots: the test CA is not among them
        error = await s.fails("decrypt", CiphertextBlob=b"blob")
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 502
        assert "its certificate does not verify" in error.response["Error"]["Message"]

    run(tmp_path, body, tls=True)


def test_a_kms_that_never_answers_is_504_within_the_bound(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        error = await s.fails("decrypt", CiphertextBlob=b"blob")
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 504
        assert "no answer from KMS at 127.0.0.1:" in error.response["Error"]["Message"]
        for _ in range(200):  # the exchange's socket was shut: its worker thread is free again
            if not s.proxy._exchanges:
                break
            await asyncio.sleep(0.02)
        assert not s.proxy._exchanges
        await s.still_serves()

    run(tmp_path, body, kms=FakeKms(mode="silent"), kms_timeout=0.5)


# -- the app as a hostile client ----------------------------------------------------------------------


def _request(body: bytes, *, target: str = "TrentService.Decrypt", scope: str = f"AKID/20260101/{REGION}/kms",
             extra: str = "", length: bool = True) -> bytes:
    head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: {target}\r\n"
            f"Content-Type: application/x-amz-json-1.1\r\n"
            f"Authorization: AWS4-HMAC-SHA256 Credential={scope}/aws4_request, SignedHeaders=host, Signature=00\r\n")
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


@pytest.mark.parametrize(("data", "status", "words"), [
    (_request(b"{}", length=False), 411, "send the body with Content-Length"),
    (_request(b"", extra="Content-Length: 1048577\r\n", length=False), 413, "takes at most 1048576"),
    (_request(b"{not json"), 400, "the Decrypt request is not usable JSON"),
    (_request(b"[1, 2]"), 400, "the Decrypt request is not a JSON object"),
    (_request(b'{"CiphertextBlob": "AQI=", "CiphertextBlob": "AwQ="}'), 400, "'CiphertextBlob' is given twice"),
    (_request(b'{"N": 1e999}'), 400, "out of range"),
    (_request(b'{"N": NaN}'), 400, "NaN is not JSON"),
    (_request(b"{}", scope=f"AKID/20260101/{REGION}/s3"), 400, "signed for the service 's3'"),
    (_request(b"{}", scope="AKID/20260101/kms"), 400, "is not AKID/DATE/REGION/SERVICE"),
    (_request(b"{}", scope="AKID/20260101/evil.example.com#/kms"), 400, "is not an AWS region name"),
    (_request(b"{}", scope="AKID/20260101/Not-A-Region/kms"), 400, "is not an AWS region name"),
    (_request(b"{}", target="DynamoDB_20120810.GetItem"), 400, "does not start with 'TrentService.'"),
    (_request(b"{}", target="TrentService."), 400, "names no action"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 400, "has no X-Amz-Target header"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.Decrypt\r\nContent-Length: 2\r\n\r\n{}", 400,
     "the request is not signed"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "GET is not allowed"),
    (b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404, "KMS's JSON protocol is POST /"),
    (b"POST / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "control character"),
])
def test_hostile_requests_get_4xx_in_kms_error_shape(tmp_path: Path, data: bytes, status: int, words: str) -> None:
    async def body(s: Stack) -> None:
        got, headers, raw = await s.raw(data)
        assert got == status, raw
        assert headers["content-type"] == "application/x-amz-json-1.1" and headers["connection"] == "close"
        error = json.loads(raw)
        assert error["__type"] == "KMSProxyError" and words in error["message"], error
        assert s.kms.seen == [] and s.lines == []
        await s.still_serves()

    run(tmp_path, body)


def test_the_request_must_arrive_within_its_bound_and_connections_are_capped(tmp_path: Path) -> None:
    async def body(s: Stack) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(_request(b'{"CiphertextBlob": "AQI="}')[:-3])  # the body's end never comes
        answer = await asyncio.wait_for(reader.read(), LIMIT)
        writer.close()
        assert b" 408 " in answer.split(b"\r\n")[0] and b"did not arrive within 0.3 s" in answer
        held = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        status, _, raw = await s.raw(b"")  # refused at the accept (a request sent first may meet a reset)
        assert status == 503 and b"2 connections open, its limit" in raw
        for _, w in held:
            w.close()

    run(tmp_path, body, request_timeout=0.3, max_connections=2)


# -- the rewriting on its own ---------------------------------------------------------------------------


def _head(text: str) -> Any:
    return parse_head(text.encode())


def test_the_region_comes_from_the_credential_scope_of_the_header_or_a_presigned_query() -> None:
    signed = _head("POST / HTTP/1.1\r\nAuthorization: AWS4-HMAC-SHA256 Credential=AK/20260101/eu-west-3/kms/"
                   "aws4_request, SignedHeaders=host;x-amz-date, Signature=ab")
    assert kms_rewrite.credential_scope(signed) == ("eu-west-3", "kms")
    presigned = _head("POST /?X-Amz-Algorithm=AWS4-HMAC-SHA256&x-amz-credential=AK%2F20260101%2Fap-south-2%2Fkms"
                      "%2Faws4_request HTTP/1.1")
    assert kms_rewrite.credential_scope(presigned) == ("ap-south-2", "kms")
    with pytest.raises(ProxyError, match="not signed with SigV4"):
        kms_rewrite.credential_scope(_head("POST / HTTP/1.1\r\nAuthorization: Bearer x"))


def test_open_answer_puts_the_plaintext_in_the_actions_field_and_only_on_200() -> None:
    key = new_key()
    for action, name in (("GenerateDataKeyPair", "PrivateKeyPlaintext"), ("DeriveSharedSecret", "SharedSecret"),
                         ("Decrypt", "Plaintext")):
        call = kms_rewrite.AppCall(action, REGION, b"{}", {})
        sealed = base64.b64encode(cms.build_enveloped(b"secret", key.spki)).decode()
        body = json.dumps({name: None, "CiphertextForRecipient": sealed, "KeyId": "k"}).encode()
        opened = json.loads(kms_rewrite.open_answer(call, 200, body, key.unseal))
        assert opened == {name: base64.b64encode(b"secret").decode(), "KeyId": "k"}
        assert kms_rewrite.open_answer(call, 400, body, key.unseal) == body
    encrypt = kms_rewrite.AppCall("Encrypt", REGION, b"{}", None)
    assert kms_rewrite.open_answer(encrypt, 200, b"anything", key.unseal) == b"anything"
    other = new_key()
    call = kms_rewrite.AppCall("Decrypt", REGION, b"{}", {})
    sealed_for_other = json.dumps({"CiphertextForRecipient": base64.b64encode(
        cms.build_enveloped(b"secret", other.spki)).decode()}).encode()
    with pytest.raises(ProxyError, match="does not open with the proxy's key"):
        kms_rewrite.open_answer(call, 200, sealed_for_other, key.unseal)
    with pytest.raises(ProxyError, match="not base64"):
        kms_rewrite.open_answer(call, 200, b'{"CiphertextForRecipient": "***"}', key.unseal)


def test_error_codes_are_read_as_botocore_reads_them() -> None:
    assert kms_rewrite.error_code(b'{"__type":"com.amazon.coral.service#ExpiredTokenException:http://x"}') == \
        "ExpiredTokenException"
    assert kms_rewrite.error_code(b'{"__type":"InvalidSignatureException","message":"m"}') == "InvalidSignatureException"
    assert kms_rewrite.error_code(b"<html>") is None and kms_rewrite.error_code(b"[1]") is None


# -- the recipient key --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_key_is_reused_then_rotated_after_its_lifetime_or_its_uses() -> None:
    made: list[RecipientKey] = []

    def generate() -> RecipientKey:
        made.append(RecipientKey(None, f"key {len(made)}".encode()))  # type: ignore[arg-type]
        return made[-1]

    async def main() -> None:
        clock = Clock()
        ring = KeyRing(lifetime=60, uses=5, clock=clock, generate=generate)
        ring.start()
        first = await ring.key()
        assert [await ring.key() for _ in range(2)] == [first, first] and len(made) == 1
        clock.t += 61  # expired: this call still gets the old key, while the next one is made in a thread
        assert await ring.key() is first
        for _ in range(100):
            if ring._next is not None and ring._next.done():
                break
            await asyncio.sleep(0.01)
        second = await ring.key()
        assert second is made[1] and second is not first and ring.made == 2
        for _ in range(4):
            assert await ring.key() is second
        assert await ring.key() is second  # the sixth use: the successor is started, not waited for
        await asyncio.sleep(0.05)
        assert await ring.key() is made[2]

    asyncio.run(main())


def test_concurrent_first_calls_share_one_key() -> None:
    async def main() -> None:
        ring = KeyRing()
        keys = await asyncio.gather(*(ring.key() for _ in range(5)))
        assert all(k is keys[0] for k in keys) and ring.made == 1
        assert serialization.load_der_public_key(keys[0].spki).key_size == 2048  # type: ignore[union-attr]

    asyncio.run(main())


# -- through the supervisor ---------------------------------------------------------------------------

APP_USES_KMS = r"""
import os, sys, boto3
from botocore.config import Config
# no endpoint_url: botocore >= 1.31 reads AWS_ENDPOINT_URL_KMS, which odyn set
kms = boto3.client("kms", config=Config(retries={"total_max_attempts": 1}))
plaintext = kms.decrypt(CiphertextBlob=b"blob")["Plaintext"]
pair = kms.generate_data_key_pair(KeyId="k", KeyPairSpec="RSA_2048")
print("kms:", kms.meta.endpoint_url, os.environ["AWS_KMS_ENDPOINT"], plaintext.decode(),
      pair["PrivateKeyPlaintext"].hex(), flush=True)
"""


def _kms_manifest(tmp_path: Path, kms_port: int, egress_port: int, proxy_port: int) -> Path:
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "enclaver.yaml").write_text(
        "version: v1\nname: app\ntarget: t\nsources: {app: a}\n"
        f"egress:\n  proxy_port: {egress_port}\n  allow: [169.254.169.254, 127.0.0.1]\n"
        f"kms_proxy:\n  listen_port: {proxy_port}\n  endpoints:\n    us-east-1: http://127.0.0.1:{kms_port}\n")
    (tmp_path / "vsock").mkdir()
    return config / "enclaver.yaml"


APP_ENV = {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": APP.access_key_id, "AWS_SECRET_ACCESS_KEY": APP.secret_access_key,
           "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


def test_an_app_in_the_enclave_uses_plain_boto3_through_odyns_kms_proxy(tmp_path: Path) -> None:
    """odyn's supervisor as in an enclave: egress (the test is the host side), the local IMDS behind it,
    an NSM, a KMS; the app is unchanged boto3 code with dummy credentials and no endpoint_url."""
    nsm = FakeNsm()
    egress_port, proxy_port = free_port(), free_port()

    async def main(url: str) -> tuple[int, bytes, FakeKms]:
        kms = await FakeKms().start()
        kms.accept = lambda akid, token: akid == INSTANCE.access_key_id
        config = _kms_manifest(tmp_path, kms.port, egress_port, proxy_port)
        host = await HostEgress(EgressPolicy.from_lists(["169.254.169.254", "127.0.0.1"], []),
                                UnixTransport(tmp_path / "vsock", 2)).serve()
        supervisor = Supervisor(UnixTransport(tmp_path / "vsock", 16), linger=0, flush=1, nsm=lambda: nsm, imds=url)
        try:
            code = await asyncio.wait_for(supervisor.run([sys.executable, "-c", APP_USES_KMS], dict(APP_ENV),
                                                         str(config)), 90)
        finally:
            host.close()
            kms.close()
        data, _, _ = supervisor._ring.read(0)
        return code, data, kms

    with local_imds(lambda: datetime.now(UTC)) as (_, url):
        code, logs, kms = asyncio.run(main(url))
    assert code == 0, logs.decode()
    endpoint = f"http://127.0.0.1:{proxy_port}"
    assert (f"odyn: KMS proxy on {endpoint} (AWS_ENDPOINT_URL_KMS, AWS_KMS_ENDPOINT), credentials from {url} "
            "through egress\n").encode() in logs
    assert f"kms: {endpoint} {endpoint} the decrypted secret {PLAINTEXTS['GenerateDataKeyPair'].hex()}\n".encode() in logs
    assert [seen.action for seen in kms.seen] == ["Decrypt", "GenerateDataKeyPair"]
    assert all(seen.access_key == INSTANCE.access_key_id and not seen.signature_problem for seen in kms.seen)
    assert len(nsm.calls) == 2


def test_a_kms_proxy_without_an_nsm_is_fatal_before_the_app_starts(tmp_path: Path) -> None:
    config = _kms_manifest(tmp_path, 1, free_port(), 9999)
    marker = tmp_path / "app-ran"

    async def main() -> tuple[int, Any]:
        supervisor = Supervisor(UnixTransport(tmp_path / "vsock", 16), linger=0, flush=1, nsm=lambda: None)
        code = await asyncio.wait_for(supervisor.run([sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                                                     dict(APP_ENV), str(config)), 60)
        return code, supervisor.status

    code, status = asyncio.run(main())
    assert code == EXIT_FATAL and not marker.exists() and status.state == "fatal"
    assert str(status.error).startswith("the manifest turns on the KMS proxy (kms_proxy.listen_port 9999) but no NSM "
                                        "is available: there is no /dev/nsm")


def test_the_imds_flag_defaults_to_the_sdk_variable_then_the_link_local_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from odyn.__main__ import parse

    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    assert parse(["--", "true"]).imds == "http://169.254.169.254"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:8111/")
    assert parse(["--", "true"]).imds == "http://127.0.0.1:8111/"
    assert parse(["--imds", "http://imds.test", "--", "true"]).imds == "http://imds.test"
    with pytest.raises(SystemExit):
        parse(["--imds", "https://imds.test", "--", "true"])


# -- the simulated NSM, and odyn's static binary --------------------------------------------------------

MEASURED = {0: bytes([0xA0]) * 48, 1: bytes([0xA1]) * 48, 2: bytes([0xA2]) * 48, 8: bytes([0xA8]) * 48}


def _verified_public_key(ca: CertificateAuthority, pcrs: dict[int, bytes]) -> Callable[[bytes], bytes]:
    """What the fake KMS does with a document: verify it against the simulator's root, require the
    measurements and a public key, and seal to that key."""
    def public_key_of(document: bytes) -> bytes:
        report = verify.verify(document, roots=[ca.root.certificate], at=datetime.now(UTC), expect_pcrs=pcrs)
        assert report.ok and report.document is not None, report.failure
        assert report.document.nonce is None and report.document.user_data is None
        assert report.document.public_key is not None
        return report.document.public_key

    return public_key_of


def test_documents_from_the_simulated_nsm_verify_and_bind_the_proxys_key(tmp_path: Path) -> None:
    ca = CertificateAuthority.open(tmp_path / "ca")
    client = NsmClient(_Direct(SimulatedNsm(ca, MEASURED)))

    async def body(s: Stack) -> None:
        assert (await s.call("decrypt", CiphertextBlob=b"blob"))["Plaintext"] == PLAINTEXTS["Decrypt"]
        assert (await s.call("generate_random", NumberOfBytes=32))["Plaintext"] == b"\x07" * 32
        documents = [verify.decode(_document_key(s, i)).document for i in range(2)]
        assert documents[0].public_key == documents[1].public_key == s.proxy.keys.current.spki  # type: ignore[union-attr]
        assert documents[0].timestamp <= documents[1].timestamp and _document_key(s, 0) != _document_key(s, 1)

    run(tmp_path, body, nsm=client, kms=FakeKms(public_key_of=_verified_public_key(ca, MEASURED)))


class _Direct:
    def __init__(self, nsm: SimulatedNsm) -> None:
        self.nsm = nsm

    def request(self, body: bytes) -> bytes:
        return self.nsm.handle(body)


def test_odyns_static_binary_serves_the_kms_proxy(tmp_path: Path, odyn_cache: Path) -> None:
    """The binary as built (botocore cut down to its signer by our PyInstaller hook, certifi's bundle,
    cryptography's native module): the simulated NSM on its socket, the local IMDS, an unchanged boto3 app."""
    from test_odyn_image import _record
    from test_odyn_supervisor import ENCLAVE_CID, collect

    store = Store(odyn_cache)
    image = load_stored(store, DEFAULT_TAG, Digest.parse(str(_record(odyn_cache)["digest"])))
    with tarfile.open(fileobj=io.BytesIO(store.read(image.manifest.layers[0].digest))) as tar:
        member = tar.extractfile(ODYN_PATH.lstrip("/"))
        assert member is not None
        binary = tmp_path / "odyn"
        binary.write_bytes(member.read())
    binary.chmod(0o755)
    ca = CertificateAuthority.open(tmp_path / "ca")
    egress_port, proxy_port = free_port(), free_port()

    async def main(url: str) -> tuple[int, list[dict[str, object]], bytes, FakeKms]:
        kms = await FakeKms(public_key_of=_verified_public_key(ca, MEASURED)).start()
        kms.accept = lambda akid, token: akid == INSTANCE.access_key_id
        config = _kms_manifest(tmp_path, kms.port, egress_port, proxy_port)
        nsm_server = await serve_nsm(SimulatedNsm(ca, MEASURED), tmp_path / "nsm.sock")
        host = await HostEgress(EgressPolicy.from_lists(["169.254.169.254", "127.0.0.1"], []),
                                UnixTransport(tmp_path / "vsock", 2)).serve()
        odyn = subprocess.Popen(
            [str(binary), "--transport", f"unix:{tmp_path / 'vsock'}", "--cid", str(ENCLAVE_CID), "--linger", "1",
             "--no-bootstrap", "--config-dir", str(config.parent), "--nsm", f"unix:{tmp_path / 'nsm.sock'}",
             "--imds", url, "--", sys.executable, "-c", APP_USES_KMS],
            env={**APP_ENV, "TMPDIR": str(tmp_path)})
        try:
            lines, logs = await asyncio.wait_for(collect(tmp_path / "vsock"), 120)
            code = await asyncio.to_thread(odyn.wait, 60)
        finally:
            if odyn.poll() is None:
                odyn.kill()
            for server in (host, nsm_server):
                server.close()
            kms.close()
        return code, lines, logs, kms

    with local_imds(lambda: datetime.now(UTC)) as (_, url):
        code, lines, logs, kms = asyncio.run(main(url))
    assert code == 0 and lines[-1] == {"status": "exited", "code": 0}, logs.decode()
    endpoint = f"http://127.0.0.1:{proxy_port}"
    assert f"kms: {endpoint} {endpoint} the decrypted secret {PLAINTEXTS['GenerateDataKeyPair'].hex()}\n".encode() in logs
    assert [seen.action for seen in kms.seen] == ["Decrypt", "GenerateDataKeyPair"]
    assert all(seen.access_key == INSTANCE.access_key_id and not seen.signature_problem for seen in kms.seen)


# -- the real local KMS -----------------------------------------------------------------------------------


def test_against_the_local_kms_a_key_that_requires_the_enclaves_pcrs(tmp_path: Path) -> None:
    """`enclaver kms serve` enforcing the policy `enclaver trust` writes (PCR0 and PCR8), the local IMDS
    serving the parent role's keys, the simulated NSM: the measured enclave gets its data key and can
    decrypt it again; an enclave with another PCR0 is refused, and its refusal passes through as it is."""
    ca = CertificateAuthority.open(tmp_path / "ca")
    root = tmp_path / "sim-root.pem"
    root.write_bytes(ca.root.certificate.public_bytes(serialization.Encoding.PEM))
    parent_key = next(k for k, (_, arn) in IDENTITIES.items() if arn == PARENT)
    measurements = {f"PCR{i}": value.hex() for i, value in MEASURED.items()}
    policy = kms_policy.key_policy(measurements, kms_policy.Trust(admin=ADMIN, principal=PARENT,
                                                                  pcrs=("PCR0", "PCR8")))
    other = dict(MEASURED)
    other[0] = bytes([0xB0]) * 48

    with local_kms(tmp_path / "kms", roots=[root], aws_root=False) as kms, local_imds_for(
            parent_key, IDENTITIES[parent_key][0]) as imds_url:
        key_id = kms.client().create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]

        def credentials(port: int) -> ImdsCredentials:
            return ImdsCredentials(imds_url, proxy=("127.0.0.1", port))

        measured = NsmClient(_Direct(SimulatedNsm(ca, MEASURED)))
        changed = NsmClient(_Direct(SimulatedNsm(ca, other)))

        async def enclave(s: Stack) -> None:
            data_key = await s.call("generate_data_key", KeyId=key_id, KeySpec="AES_256")
            assert len(data_key["Plaintext"]) == 32
            again = await s.call("decrypt", CiphertextBlob=data_key["CiphertextBlob"], KeyId=key_id)
            assert again["Plaintext"] == data_key["Plaintext"] and again["KeyId"].endswith(key_id)
            pair = await s.call("generate_data_key_pair", KeyId=key_id, KeyPairSpec="RSA_2048")
            private = serialization.load_der_private_key(pair["PrivateKeyPlaintext"], None)
            assert private.public_key().public_bytes(  # type: ignore[union-attr]
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == pair["PublicKey"]
            sealed.append(data_key["CiphertextBlob"])

        async def impostor(s: Stack) -> None:
            error = await s.fails("decrypt", CiphertextBlob=sealed[0], KeyId=key_id)
            assert error.response["Error"]["Code"] == "AccessDeniedException"
            assert s.lines == []  # a refusal by KMS is not odyn's failure

        sealed: list[bytes] = []
        for name in ("measured", "changed"):
            (tmp_path / name).mkdir()
        run(tmp_path / "measured", enclave, endpoint=kms.endpoint, nsm=measured, credentials=credentials)
        run(tmp_path / "changed", impostor, endpoint=kms.endpoint, nsm=changed, credentials=credentials)
        direct = kms.client(parent_key)  # the parent itself, without attestation: refused too
        with pytest.raises(ClientError, match="AccessDeniedException"):
            direct.decrypt(CiphertextBlob=sealed[0], KeyId=key_id)


@contextlib.contextmanager
def local_imds_for(access_key_id: str, secret: str) -> Iterator[str]:
    imds = LocalImds("EnclaveParent", Identity(access_key_id, secret))
    server = serve_imds(imds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_kms_proxy_without_egress_is_refused_with_upstreams_words(tmp_path: Path) -> None:
    """`manifest check` refuses such a manifest first; odyn checks again, as upstream does at start-up."""
    from enclaver_rules.errors import EnclaverError
    from enclaver_rules.manifest import Manifest

    manifest = Manifest.from_data({"version": "v1", "name": "a", "target": "t", "sources": {"app": "a"},
                                   "kms_proxy": {"listen_port": 9999}})
    supervisor = Supervisor(UnixTransport(tmp_path, 16), nsm=lambda: FakeNsm())
    with pytest.raises(EnclaverError) as refused:
        asyncio.run(supervisor._start_kms_proxy(manifest, lambda handler: handler))
    assert str(refused.value) == ("KMS proxy is configured but egress is not. Configure egress allow policy to access "
                                  "the IMDS at 169.254.169.254 and the AWS KMS endpoint")
