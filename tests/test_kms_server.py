"""The local KMS through real SDK calls: every action, encryption context, ciphertext checks, SigV4,
validation from botocore's model, persistence across restarts, and hostile HTTP clients."""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaver_rules.kms import sigv4
from kms_helpers import ACCOUNT, ADMIN, IDENTITIES, OUTSIDER, PARENT, REGION, RunningKms, local_kms, run_serve


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    with local_kms(tmp_path_factory.mktemp("kms") / "state") as running:
        yield running


def code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Code"])


def message(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Message"])


def new_key(kms: RunningKms, **kwargs: Any) -> str:
    return str(kms.client().create_key(**kwargs)["KeyMetadata"]["KeyId"])


# --- every action, round trip ------------------------------------------------------------------------------


def test_create_describe_list(kms: RunningKms) -> None:
    client = kms.client()
    meta = client.create_key(Description="for a test")["KeyMetadata"]
    arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{meta['KeyId']}"
    assert meta["Arn"] == arn and meta["AWSAccountId"] == ACCOUNT and meta["Enabled"]
    assert (meta["KeyState"], meta["KeySpec"], meta["KeyUsage"], meta["Origin"]) == \
        ("Enabled", "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", "AWS_KMS")
    assert meta["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"] and meta["Description"] == "for a test"
    for key_id in (meta["KeyId"], arn):
        assert client.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"] == arn
    listed = [k["KeyId"] for k in client.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 1})
              .build_full_result()["Keys"]]
    assert meta["KeyId"] in listed and len(listed) == len(set(listed))
    with pytest.raises(ClientError) as e:
        client.describe_key(KeyId="alias/nope")
    assert code(e) == "NotFoundException"
    with pytest.raises(ClientError) as e:
        client.describe_key(KeyId="0" * 8 + "-0000-0000-0000-" + "0" * 12)
    assert code(e) == "NotFoundException" and "does not exist" in message(e)


def test_the_default_key_policy_is_aws_s(kms: RunningKms) -> None:
    key = new_key(kms)
    policy = json.loads(kms.client().get_key_policy(KeyId=key, PolicyName="default")["Policy"])
    assert policy["Statement"] == [{"Sid": "Enable IAM User Permissions", "Effect": "Allow",
                                    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*",
                                    "Resource": "*"}]
    # the account root admits every principal of the account, nobody else
    kms.client("AKIDPARENT").describe_key(KeyId=key)
    with pytest.raises(ClientError) as e:
        kms.client("AKIDOUTSIDER").describe_key(KeyId=key)
    assert code(e) == "AccessDeniedException"
    arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key}"
    assert message(e) == (f"User: {OUTSIDER} is not authorized to perform: kms:DescribeKey on resource: {arn} "
                          f"because no resource-based policy allows the kms:DescribeKey action")


def test_encrypt_decrypt(kms: RunningKms) -> None:
    client, key = kms.client(), new_key(kms)
    out = client.encrypt(KeyId=key, Plaintext=b"secret")
    assert out["KeyId"].endswith(key) and out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    for extra in ({}, {"KeyId": key}, {"KeyId": out["KeyId"]}):
        back = client.decrypt(CiphertextBlob=out["CiphertextBlob"], **extra)
        assert back["Plaintext"] == b"secret" and back["KeyId"] == out["KeyId"]
    assert client.encrypt(KeyId=key, Plaintext=b"secret")["CiphertextBlob"] != out["CiphertextBlob"]
    big = os.urandom(4096)
    assert client.decrypt(CiphertextBlob=client.encrypt(KeyId=key, Plaintext=big)["CiphertextBlob"])["Plaintext"] == big


def test_encryption_context_is_order_free_and_bound(kms: RunningKms) -> None:
    client, key = kms.client(), new_key(kms)
    blob = client.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext={"a": "1", "b": "2", "ü": "ß"})["CiphertextBlob"]
    assert client.decrypt(CiphertextBlob=blob, EncryptionContext={"ü": "ß", "b": "2", "a": "1"})["Plaintext"] == b"x"
    for wrong in ({}, {"a": "1"}, {"a": "1", "b": "3", "ü": "ß"}, {"a": "1", "b": "2", "ü": "ß", "c": "4"}):
        with pytest.raises(ClientError) as e:
            client.decrypt(CiphertextBlob=blob, EncryptionContext=wrong)
        assert code(e) == "InvalidCiphertextException", wrong
    plain = client.encrypt(KeyId=key, Plaintext=b"y")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:
        client.decrypt(CiphertextBlob=plain, EncryptionContext={"a": "1"})
    assert code(e) == "InvalidCiphertextException"


def test_tampered_and_foreign_blobs(kms: RunningKms) -> None:
    client, key = kms.client(), new_key(kms)
    blob = client.encrypt(KeyId=key, Plaintext=b"secret")["CiphertextBlob"]
    aws_shaped = bytes.fromhex("0102030078") + os.urandom(179)  # what a real KMS blob starts with
    for index in (0, 4, 5, 10, len(blob) - 20, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(ClientError) as e:
            client.decrypt(CiphertextBlob=bytes(tampered))
        assert code(e) in ("InvalidCiphertextException", "NotFoundException"), index
        assert code(e) == "InvalidCiphertextException" or index >= 6
    for foreign in (aws_shaped, b"\x00", blob[:30]):
        with pytest.raises(ClientError) as e:
            client.decrypt(CiphertextBlob=foreign)
        assert code(e) == "InvalidCiphertextException"


def test_a_ciphertext_of_another_key_is_incorrect_key(kms: RunningKms) -> None:
    client, one, two = kms.client(), new_key(kms), new_key(kms)
    blob = client.encrypt(KeyId=one, Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:
        client.decrypt(CiphertextBlob=blob, KeyId=two)
    assert code(e) == "IncorrectKeyException"


def test_generate_data_key(kms: RunningKms) -> None:
    client, key = kms.client(), new_key(kms)
    for spec, size in (({"KeySpec": "AES_256"}, 32), ({"KeySpec": "AES_128"}, 16), ({"NumberOfBytes": 7}, 7)):
        out = client.generate_data_key(KeyId=key, EncryptionContext={"k": "v"}, **spec)
        assert len(out["Plaintext"]) == size and out["KeyId"].endswith(key)
        assert client.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"k": "v"})["Plaintext"] == \
            out["Plaintext"]
    out = client.generate_data_key_without_plaintext(KeyId=key, KeySpec="AES_256")
    assert "Plaintext" not in out and len(client.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"]) == 32
    unvalidated = kms.client(validate=False)
    for bad in ({}, {"KeySpec": "AES_256", "NumberOfBytes": 32}):
        with pytest.raises(ClientError) as e:
            unvalidated.generate_data_key(KeyId=key, **bad)
        assert code(e) == "ValidationException"


@pytest.mark.parametrize("spec", ["RSA_2048", "ECC_NIST_P256", "ECC_SECG_P256K1"])
def test_generate_data_key_pair(kms: RunningKms, spec: str) -> None:
    client, key = kms.client(), new_key(kms)
    out = client.generate_data_key_pair(KeyId=key, KeyPairSpec=spec)
    assert out["KeyPairSpec"] == spec and out["KeyId"].endswith(key)
    private = serialization.load_der_private_key(out["PrivateKeyPlaintext"], password=None)
    assert private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == out["PublicKey"]
    assert isinstance(private, rsa.RSAPrivateKey if spec.startswith("RSA") else ec.EllipticCurvePrivateKey)
    assert client.decrypt(CiphertextBlob=out["PrivateKeyCiphertextBlob"])["Plaintext"] == out["PrivateKeyPlaintext"]
    bare = client.generate_data_key_pair_without_plaintext(KeyId=key, KeyPairSpec=spec)
    assert "PrivateKeyPlaintext" not in bare
    serialization.load_der_private_key(client.decrypt(CiphertextBlob=bare["PrivateKeyCiphertextBlob"])["Plaintext"],
                                       password=None)


def test_generate_random_any_identity_and_limits(kms: RunningKms) -> None:
    for identity in IDENTITIES:
        assert len(kms.client(identity).generate_random(NumberOfBytes=1024)["Plaintext"]) == 1024
    assert len(kms.client().generate_random(NumberOfBytes=1)["Plaintext"]) == 1
    unvalidated = kms.client("AKIDOUTSIDER", validate=False)
    for size in (0, 1025, -1):
        with pytest.raises(ClientError) as e:
            unvalidated.generate_random(NumberOfBytes=size)
        assert code(e) == "ValidationException" and "numberOfBytes" in message(e), size
    with pytest.raises(ClientError) as e:
        unvalidated.generate_random()
    assert code(e) == "ValidationException"


def test_put_and_get_key_policy(kms: RunningKms) -> None:
    client, key = kms.client(), new_key(kms)
    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": ADMIN}, "Action": "kms:*", "Resource": "*"},
        {"Sid": "ParentEncrypts", "Effect": "Allow", "Principal": {"AWS": PARENT}, "Action": "kms:Encrypt",
         "Resource": "*", "Condition": {"StringEquals": {"aws:PrincipalArn": PARENT, "kms:CallerAccount": ACCOUNT}}}]}
    text = json.dumps(policy, indent=4)
    client.put_key_policy(KeyId=key, PolicyName="default", Policy=text)
    assert client.get_key_policy(KeyId=key)["Policy"] == text  # as put
    parent = kms.client("AKIDPARENT")
    blob = parent.encrypt(KeyId=key, Plaintext=b"p")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:
        parent.decrypt(CiphertextBlob=blob)
    assert code(e) == "AccessDeniedException" and "kms:Decrypt" in message(e)
    with pytest.raises(ClientError) as e:
        parent.put_key_policy(KeyId=key, Policy=text)
    assert code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:
        client.get_key_policy(KeyId=key, PolicyName="other")
    assert code(e) == "NotFoundException"


def test_re_encrypt_and_grants(kms: RunningKms) -> None:
    client, one, two = kms.client(), new_key(kms), new_key(kms)
    blob = client.encrypt(KeyId=one, Plaintext=b"move me", EncryptionContext={"a": "b"})["CiphertextBlob"]
    moved = client.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext={"a": "b"}, DestinationKeyId=two,
                              DestinationEncryptionContext={"c": "d"})
    assert moved["SourceKeyId"].endswith(one) and moved["KeyId"].endswith(two)
    assert client.decrypt(CiphertextBlob=moved["CiphertextBlob"], EncryptionContext={"c": "d"})["Plaintext"] == \
        b"move me"
    # a grant lets an outsider the key policy does not name
    outsider = kms.client("AKIDOUTSIDER")
    with pytest.raises(ClientError):
        outsider.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})
    grant = client.create_grant(KeyId=one, GranteePrincipal=OUTSIDER, Operations=["Decrypt"], Name="g")
    assert outsider.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})["Plaintext"] == b"move me"
    listed = client.list_grants(KeyId=one)["Grants"]
    assert [(g["GrantId"], g["GranteePrincipal"], g["Operations"]) for g in listed] == \
        [(grant["GrantId"], OUTSIDER, ["Decrypt"])]
    client.revoke_grant(KeyId=one, GrantId=grant["GrantId"])
    with pytest.raises(ClientError) as e:
        outsider.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})
    assert code(e) == "AccessDeniedException"


def test_ecc_key_agreement(kms: RunningKms) -> None:
    client = kms.client()
    key = new_key(kms, KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")
    meta = client.describe_key(KeyId=key)["KeyMetadata"]
    assert meta["KeyAgreementAlgorithms"] == ["ECDH"] and meta["KeyUsage"] == "KEY_AGREEMENT"
    public = serialization.load_der_public_key(client.get_public_key(KeyId=key)["PublicKey"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    mine = ec.generate_private_key(ec.SECP256R1())
    spki = mine.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    out = client.derive_shared_secret(KeyId=key, KeyAgreementAlgorithm="ECDH", PublicKey=spki)
    assert out["SharedSecret"] == mine.exchange(ec.ECDH(), public) and out["KeyOrigin"] == "AWS_KMS"
    other = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for bad in (other, b"junk"):
        with pytest.raises(ClientError) as e:
            client.derive_shared_secret(KeyId=key, KeyAgreementAlgorithm="ECDH", PublicKey=bad)
        assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        client.encrypt(KeyId=key, Plaintext=b"x")
    assert code(e) == "InvalidKeyUsageException"
    symmetric = new_key(kms)
    with pytest.raises(ClientError) as e:
        client.derive_shared_secret(KeyId=symmetric, KeyAgreementAlgorithm="ECDH", PublicKey=spki)
    assert code(e) == "InvalidKeyUsageException"


def test_dry_run(kms: RunningKms) -> None:
    key = new_key(kms)
    with pytest.raises(ClientError) as e:
        kms.client().encrypt(KeyId=key, Plaintext=b"x", DryRun=True)
    assert code(e) == "DryRunOperationException"


def test_unsupported_things_are_said(kms: RunningKms) -> None:
    client = kms.client()
    with pytest.raises(ClientError) as e:
        client.create_alias(AliasName="alias/x", TargetKeyId=new_key(kms))
    assert code(e) == "UnknownOperationException"
    with pytest.raises(ClientError) as e:
        client.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")
    assert code(e) == "UnsupportedOperationException"


# --- SigV4 ------------------------------------------------------------------------------------------------


def test_unknown_access_key_and_wrong_secret(kms: RunningKms) -> None:
    with pytest.raises(ClientError) as e:
        kms.client("AKIDNOBODY", secret="x").list_keys()
    assert code(e) == "UnrecognizedClientException"
    with pytest.raises(ClientError) as e:
        kms.client("AKIDADMIN", secret="admin-secret/+y").list_keys()
    assert code(e) == "InvalidSignatureException"
    with pytest.raises(ClientError) as e:
        kms.client("AKIDADMIN", region="eu-west-1").list_keys()
    assert code(e) == "InvalidSignatureException" and "region" in message(e)


def test_a_session_token_is_accepted_for_a_known_key(kms: RunningKms) -> None:
    assert kms.client("AKIDPARENT", token="from-the-local-imds").generate_random(NumberOfBytes=4)["Plaintext"]


def _signed(kms: RunningKms, body: bytes, *, target: str = "TrentService.ListKeys", access_key: str = "AKIDADMIN",
            when: datetime | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    request = AWSRequest(method="POST", url=kms.endpoint + "/", data=body,
                         headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target,
                                  **(extra or {})})
    secret = IDENTITIES[access_key][0]
    auth = SigV4Auth(ReadOnlyCredentials(access_key, secret, None), "kms", REGION)
    if when is None:
        auth.add_auth(request)
    else:
        request.context["timestamp"] = when.strftime(sigv4.TIMESTAMP)
        request.headers["X-Amz-Date"] = request.context["timestamp"]
        signature = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
        request.headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={auth.scope(request)}, "
            f"SignedHeaders={auth.signed_headers(auth.headers_to_sign(request))}, Signature={signature}")
    return dict(request.headers.items())


def _post(kms: RunningKms, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", kms.port, timeout=30)
    try:
        connection.request("POST", "/", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_clock_skew_is_fifteen_minutes(kms: RunningKms) -> None:
    now = datetime.now(UTC)
    for offset, ok in ((timedelta(minutes=-10), True), (timedelta(minutes=10), True),
                       (timedelta(minutes=-20), False), (timedelta(minutes=20), False)):
        status, body = _post(kms, b"{}", _signed(kms, b"{}", when=now + offset))
        assert (status == 200) == ok, (offset, body)
        if not ok:
            assert body["__type"] == "InvalidSignatureException" and "Signature" in body["message"]


def test_the_body_is_signed(kms: RunningKms) -> None:
    headers = _signed(kms, b'{"Limit": 5}')
    assert _post(kms, b'{"Limit": 5}', headers)[0] == 200
    status, body = _post(kms, b'{"Limit": 6}', headers)
    assert (status, body["__type"]) == (400, "InvalidSignatureException")
    headers = _signed(kms, b"{}")
    headers.pop("Authorization")
    assert _post(kms, b"{}", headers)[1]["__type"] == "MissingAuthenticationTokenException"


def test_wire_errors_name_the_field(kms: RunningKms) -> None:
    cases = [
        (b"{not json", "TrentService.ListKeys", "SerializationException", "JSON"),
        (b'{"Limit": "5"}', "TrentService.ListKeys", "SerializationException", "limit"),
        (b'{"NumberOfBytes": 1025}', "TrentService.GenerateRandom", "ValidationException", "numberOfBytes"),
        (b'{"KeyId": "k", "Plaintext": "***"}', "TrentService.Encrypt", "SerializationException", "plaintext"),
        (b'{"Plaintext": "AA=="}', "TrentService.Encrypt", "ValidationException", "keyId"),
        (b"{}", "TrentService.NoSuchThing", "UnknownOperationException", "NoSuchThing"),
        (b"{}", "Other.ListKeys", "UnknownOperationException", "TrentService."),
        (b'{"Limit": 1, "Limit": 2}', "TrentService.ListKeys", "SerializationException", "twice"),
    ]
    for body, target, error, field in cases:
        status, answer = _post(kms, body, _signed(kms, body, target=target))
        assert status == 400 and answer["__type"] == error and field in answer["message"], (body, answer)


# --- hostile clients ----------------------------------------------------------------------------------------


def _alive(kms: RunningKms) -> None:
    assert len(kms.client().generate_random(NumberOfBytes=8)["Plaintext"]) == 8


def test_huge_content_length_is_refused_unread(kms: RunningKms) -> None:
    with socket.create_connection(("127.0.0.1", kms.port), timeout=30) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and b"SerializationException" in answer
    _alive(kms)


def test_garbage_and_half_requests_do_not_hurt(kms: RunningKms) -> None:
    for junk in (b"\x00\xff" * 1000, b"GET / HTTP/1.1\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
                 b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                 b"POST / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", b"A" * 70000 + b"\r\n"):
        with socket.create_connection(("127.0.0.1", kms.port), timeout=30) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        _alive(kms)


def test_a_silent_client_does_not_block_others(kms: RunningKms) -> None:
    with socket.create_connection(("127.0.0.1", kms.port), timeout=30) as slow:
        slow.sendall(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # and then nothing
        _alive(kms)


def test_connections_beyond_the_cap_are_closed(kms: RunningKms) -> None:
    from enclaver_rules.kms.server import MAX_CONNECTIONS

    sockets = [socket.create_connection(("127.0.0.1", kms.port), timeout=30) for _ in range(MAX_CONNECTIONS + 8)]
    try:
        closed: set[socket.socket] = set()
        deadline = time.monotonic() + 30
        while len(closed) < 8 and time.monotonic() < deadline:  # at least the 8 beyond the cap are closed at once
            readable, _, _ = select.select([s for s in sockets if s not in closed], [], [], 1)
            closed.update(s for s in readable if s.recv(1) == b"")
        assert len(closed) >= 8
    finally:
        for s in sockets:
            s.close()
    deadline = time.monotonic() + 30
    while True:  # the server notices the closed sockets, and answers again
        try:
            _alive(kms)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- persistence, the state directory -------------------------------------------------------------------


def test_keys_and_policies_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": ADMIN}, "Action": "kms:*", "Resource": "*"}]})
    with local_kms(state) as first:
        client = first.client()
        key = client.create_key(Policy=policy)["KeyMetadata"]["KeyId"]
        blob = client.encrypt(KeyId=key, Plaintext=b"kept", EncryptionContext={"x": "y"})["CiphertextBlob"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = sorted((state / "keys").iterdir())
    assert [f.name for f in files] == [f"{key}.json"] and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert base64.b64encode(blob).decode() not in files[0].read_text()
    with local_kms(state) as second:
        client = second.client()
        assert client.decrypt(CiphertextBlob=blob, EncryptionContext={"x": "y"})["Plaintext"] == b"kept"
        assert client.get_key_policy(KeyId=key)["Policy"] == policy
        with pytest.raises(ClientError):
            second.client("AKIDPARENT").decrypt(CiphertextBlob=blob, EncryptionContext={"x": "y"})
        result = run_serve(state)  # a second server on the same directory
        assert result.returncode == 1 and "in use by another local KMS" in result.stderr


def test_an_open_state_directory_or_key_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with local_kms(state) as running:
        key = new_key(running)
    (state / "keys" / f"{key}.json").chmod(0o644)
    result = run_serve(state)
    assert result.returncode == 2 and "can be read by others" in result.stderr
    (state / "keys" / f"{key}.json").chmod(0o600)
    state.chmod(0o755)
    result = run_serve(state)
    assert result.returncode == 2 and "chmod 700" in result.stderr


def test_bad_flags(tmp_path: Path) -> None:
    for identity, text in (("nocolon", "no secret"), ("AKID:secret=notanarn", "not an IAM"),
                           ("A:s=arn:aws:iam::111122223333:root", "access key id"),
                           ("AKIDX:s=arn:aws:iam::111122223333:root --identity", "not an IAM")):
        result = run_serve(tmp_path / "s", {}, "--identity", identity)
        assert result.returncode == 2 and text in result.stderr, result.stderr
        assert "secret=" not in result.stderr
    result = run_serve(tmp_path / "s", {}, "--attestation-root", str(tmp_path / "missing.pem"))
    assert result.returncode == 2 and "--attestation-root" in result.stderr


def test_the_ready_line_names_no_secret(kms: RunningKms) -> None:
    assert kms.ready_line.startswith(f"ready {kms.endpoint} region={REGION} account={ACCOUNT} ")
    assert "identities=AKIDADMIN,AKIDPARENT,AKIDOUTSIDER" in kms.ready_line
    assert "roots=sha256:641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b" in kms.ready_line
    for secret, _ in IDENTITIES.values():
        assert secret not in kms.ready_line and secret not in kms.stderr()


# --- the parsers alone: hostile input gives a ServiceError, never another exception ---------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                  max_size=4), max_leaves=12)
_members = st.dictionaries(st.sampled_from(["KeyId", "CiphertextBlob", "EncryptionContext", "Recipient", "Plaintext",
                                            "NumberOfBytes", "KeySpec", "GrantTokens", "Limit", "Policy"]), _json,
                           max_size=5)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["Decrypt", "Encrypt", "GenerateRandom", "CreateKey", "ListKeys", "PutKeyPolicy",
                        "GenerateDataKeyPair", "CreateGrant"]), _json | _members)
def test_model_validation_only_raises_service_errors(action: str, body: Any) -> None:
    from enclaver_rules.kms import shapes
    from enclaver_rules.kms.wire import ServiceError

    try:
        shapes.parse_input(action, body)
    except ServiceError as e:
        assert e.code in ("ValidationException", "SerializationException")


_header = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=120)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Authorization", "X-Amz-Date", "Host", "Content-Type", "X-Amz-Target",
                                           "X-Amz-Content-SHA256", "authorization"]), _header), max_size=6),
       st.binary(max_size=64))
def test_sigv4_only_raises_service_errors(headers: list[tuple[str, str]], body: bytes) -> None:
    from enclaver_rules.kms.wire import ServiceError

    identities = {"AKIDADMIN": sigv4.Identity("AKIDADMIN", "s", ADMIN)}
    with pytest.raises(ServiceError):
        sigv4.verify(method="POST", path="/", headers=headers, body=body, identities=identities, region=REGION,
                     now=datetime.now(UTC))


def test_sigint_ends_it_cleanly(tmp_path: Path) -> None:
    with local_kms(tmp_path / "state") as running:
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=30) == 0
    assert "stopped" in running.stderr()


def test_concurrent_requests_and_grants(kms: RunningKms) -> None:
    key = new_key(kms)

    def work(i: int) -> str:
        client = kms.client()
        blob = client.encrypt(KeyId=key, Plaintext=str(i).encode(), EncryptionContext={"i": str(i)})["CiphertextBlob"]
        assert client.decrypt(CiphertextBlob=blob, EncryptionContext={"i": str(i)})["Plaintext"] == str(i).encode()
        return str(client.create_grant(KeyId=key, GranteePrincipal=PARENT, Operations=["Encrypt"])["GrantId"])

    with ThreadPoolExecutor(8) as pool:
        made = set(pool.map(work, range(16)))
    assert {g["GrantId"] for g in kms.client().list_grants(KeyId=key)["Grants"]} == made


def test_the_blob_format_binds_key_and_context() -> None:
    from enclaver_rules.kms import ciphertext

    material, key_id = os.urandom(32), "0" * 8 + "-1111-2222-3333-" + "4" * 12
    blob = ciphertext.seal(key_id, material, b"data", {"b": "2", "a": "1"})
    assert blob.startswith(b"ELKM\x01\x24" + key_id.encode())
    parsed = ciphertext.parse(blob)
    assert parsed.key_id == key_id and ciphertext.unseal(parsed, material, {"a": "1", "b": "2"}) == b"data"
    for context in ({"a": "1"}, None, {"a": "1", "b": "2", "c": ""}):
        with pytest.raises(ciphertext.InvalidCiphertext):
            ciphertext.unseal(parsed, material, context)
    other_id = key_id[:-1] + "5"  # the key id is authenticated: moving a blob to another id fails its tag
    moved = ciphertext.parse(blob.replace(key_id.encode(), other_id.encode()))
    with pytest.raises(ciphertext.InvalidCiphertext):
        ciphertext.unseal(moved, material, {"a": "1", "b": "2"})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_no_blob_or_fail_their_tag(data: bytes) -> None:
    from enclaver_rules.kms import ciphertext

    with pytest.raises(ciphertext.InvalidCiphertext):
        ciphertext.unseal(ciphertext.parse(data), os.urandom(32), {})
    with pytest.raises(ciphertext.InvalidCiphertext):
        ciphertext.unseal(ciphertext.parse(b"ELKM\x01\x03abc" + data.ljust(28, b"\x00")), os.urandom(32), {})
