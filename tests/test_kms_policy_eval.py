"""Key policies in the local KMS: what `validate_policy` refuses (never a silently ignored condition),
the lock-out check, the request context, and the policy `enclaver trust` writes enforced against
documents from the simulated NSM — the right enclave gets CiphertextForRecipient, nobody else
anything."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclaver_rules.kms.cms import open_enveloped
from enclaver_rules.policy import kms as policy
from enclaver_rules.runtime.sim_nsm import CertificateAuthority, SimulatedNsm
from kms_helpers import ACCOUNT, ADMIN, PARENT, REGION, RunningKms, local_kms
from odyn.nsm import NsmClient

MEASURED = {0: bytes.fromhex("a0" * 48), 1: bytes.fromhex("a1" * 48), 2: bytes.fromhex("a2" * 48),
            8: bytes.fromhex("a8" * 48)}
MEASUREMENTS = {f"PCR{i}": v.hex() for i, v in MEASURED.items()}
KEY_ARN_PREFIX = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/"


# --- validate_policy, pure -------------------------------------------------------------------------------


def _statement(**fields: Any) -> dict[str, Any]:
    return {"Sid": "S", "Effect": "Allow", "Principal": {"AWS": ADMIN}, "Action": "kms:*", "Resource": "*",
            **fields}


def _policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def test_what_the_project_writes_is_valid() -> None:
    for trust in (policy.Trust(ADMIN, PARENT), policy.Trust(ADMIN, PARENT, ("PCR0", "PCR1", "PCR2", "PCR8")),
                  policy.Trust(ADMIN, PARENT, immutable=True)):
        policy.validate_policy(policy.key_policy(MEASUREMENTS, trust))
    policy.validate_policy(policy.default_key_policy(ACCOUNT))


@pytest.mark.parametrize("operator", ["StringEquals", "StringNotEquals", "StringEqualsIgnoreCase",
                                      "StringNotEqualsIgnoreCase", "StringLike", "StringNotLike", "Bool",
                                      "StringEqualsIfExists", "StringNotLikeIfExists", "BoolIfExists", "Null"])
@pytest.mark.parametrize("key", ["kms:RecipientAttestation:ImageSha384", "KMS:recipientattestation:imagesha384",
                                 "kms:RecipientAttestation:PCR0", "kms:RecipientAttestation:PCR17",
                                 "kms:RecipientAttestation:PCR31", "aws:PrincipalArn", "kms:CallerAccount"])
def test_supported_keys_and_operators(operator: str, key: str) -> None:
    value = "true" if operator.startswith(("Bool", "Null")) else ["a", "b*"]
    policy.validate_policy(_policy(_statement(Condition={operator: {key: value}})))


REFUSED = [
    ({"Condition": {"StringEquals": {"aws:SourceIp": "10.0.0.1"}}}, "condition key 'aws:SourceIp'"),
    ({"Condition": {"StringEquals": {"kms:RecipientAttestation:PCR32": "x"}}}, "PCR32"),
    ({"Condition": {"StringEquals": {"kms:RecipientAttestation:NitroTPMPCR0": "x"}}}, "NitroTPMPCR0"),
    ({"Condition": {"StringEquals": {"kms:EncryptionContext:k": "x"}}}, "kms:EncryptionContext:k"),
    ({"Condition": {"NumericLessThan": {"kms:CallerAccount": "1"}}}, "operator 'NumericLessThan'"),
    ({"Condition": {"ForAnyValue:StringEquals": {"aws:PrincipalArn": "x"}}}, "ForAnyValue:StringEquals"),
    ({"Condition": {"ArnLike": {"aws:PrincipalArn": "x"}}}, "ArnLike"),
    ({"Condition": {"NullIfExists": {"aws:PrincipalArn": "true"}}}, "NullIfExists"),
    ({"Condition": {"Bool": {"aws:PrincipalArn": "maybe"}}}, "true or false"),
    ({"Condition": {"StringEquals": {"aws:PrincipalArn": []}}}, "non-empty"),
    ({"Condition": {"StringEquals": {"aws:PrincipalArn": "${aws:username}"}}}, "policy variable"),
    ({"Condition": "x"}, "object of operators"),
    ({"NotPrincipal": {"AWS": ADMIN}}, "NotPrincipal is not modelled"),
    ({"NotResource": "*"}, "NotResource is not modelled"),
    ({"Effect": "Maybe"}, "Effect"),
    ({"Principal": {"CanonicalUser": "x"}}, "CanonicalUser"),
    ({"Principal": {"AWS": "bob"}}, "is not \"*\", an account ID"),
    ({"Principal": None}, "every statement needs one"),
    ({"Action": "decrypt"}, "is not an action"),
    ({"Action": "kms:Decrypt", "NotAction": "kms:Encrypt"}, "Action and NotAction together"),
    ({"Resource": 5}, "Resource"),
    ({"Extra": 1}, "unsupported field 'Extra'"),
]


@pytest.mark.parametrize(("fields", "text"), REFUSED, ids=[t for _, t in REFUSED])
def test_what_the_evaluator_does_not_model_is_refused(fields: dict[str, Any], text: str) -> None:
    with pytest.raises(policy.MalformedPolicy) as e:
        policy.validate_policy(_policy(_statement(**fields)))
    assert text in str(e.value) and "Statement[0] (S)" in str(e.value)


def test_policy_level_refusals() -> None:
    for document, text in (([], "not a JSON object"), ({"Statement": []}, "no Statement"),
                           ({"Version": "2020-01-01", "Statement": [_statement()]}, "Version"),
                           ({"Statement": [_statement()], "Other": 1}, "unsupported field")):
        with pytest.raises(policy.MalformedPolicy, match=text):
            policy.validate_policy(document)


def test_request_context() -> None:
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/EnclaveParent/i-0123"
    assert policy.request_context(session) == {"aws:PrincipalArn": PARENT, "kms:CallerAccount": ACCOUNT}
    context = policy.request_context(PARENT, {0: b"\xab" * 48, 3: b"\x00" * 48, 16: b"\x01" * 48})
    assert context["kms:RecipientAttestation:ImageSha384"] == "ab" * 48
    assert context["kms:RecipientAttestation:PCR0"] == "ab" * 48
    assert context["kms:RecipientAttestation:PCR16"] == "01" * 48
    assert context["kms:RecipientAttestation:PCR3"] == "00" * 48
    assert context["aws:PrincipalArn"] == PARENT and context["kms:CallerAccount"] == ACCOUNT


def test_principal_conditions_are_enforced() -> None:
    document = _policy(_statement(Principal="*", Condition={"StringEquals": {"aws:PrincipalArn": PARENT}}),
                       _statement(Sid="D", Effect="Deny", Principal="*", Action="kms:Decrypt",
                                  Condition={"StringNotEquals": {"kms:CallerAccount": ACCOUNT}}))
    assert policy.evaluate(document, PARENT, "kms:Encrypt", policy.request_context(PARENT)).allowed
    assert not policy.evaluate(document, ADMIN, "kms:Encrypt", policy.request_context(ADMIN)).allowed
    outsider = "arn:aws:iam::444455556666:root"
    decision = policy.evaluate(document, outsider, "kms:Decrypt", policy.request_context(outsider))
    assert decision.explicit_deny


def test_lockout() -> None:
    policy.check_lockout(policy.key_policy(MEASUREMENTS, policy.Trust(ADMIN, PARENT)), ADMIN)
    immutable = policy.key_policy(MEASUREMENTS, policy.Trust(ADMIN, PARENT, immutable=True))
    with pytest.raises(policy.MalformedPolicy, match="will not allow you to update the key policy in the future"):
        policy.check_lockout(immutable, ADMIN)
    with pytest.raises(policy.MalformedPolicy):  # the parent is no administrator
        policy.check_lockout(policy.key_policy(MEASUREMENTS, policy.Trust(ADMIN, PARENT)), PARENT)
    # an account-ID principal is the account's root: it admits the account's principals
    policy.check_lockout(_policy(_statement(Principal={"AWS": ACCOUNT})), ADMIN)


def test_a_resource_other_than_this_key_does_not_apply() -> None:
    document = _policy(_statement(Resource=f"{KEY_ARN_PREFIX}other"))
    assert not policy.evaluate(document, ADMIN, "kms:Encrypt", {}, resource=f"{KEY_ARN_PREFIX}this").allowed
    assert policy.evaluate(document, ADMIN, "kms:Encrypt", {}, resource=f"{KEY_ARN_PREFIX}other").allowed
    no_resource = {k: v for k, v in _statement().items() if k != "Resource"}
    assert not policy.evaluate(_policy(no_resource), ADMIN, "kms:Encrypt", {}).allowed  # "has no effect"


# --- through the server, with the simulated NSM ------------------------------------------------------------


@dataclass
class Enclave:
    """An enclave's NSM and its RSA key, as odyn's KMS proxy would hold them."""

    nsm: SimulatedNsm
    key: rsa.RSAPrivateKey

    @property
    def spki(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def recipient(self, public_key: bytes | None = None) -> dict[str, Any]:
        document = NsmClient(_Direct(self.nsm)).attestation(public_key=self.spki if public_key is None else public_key)
        return {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": document}


class _Direct:
    def __init__(self, nsm: SimulatedNsm) -> None:
        self.nsm = nsm

    def request(self, body: bytes) -> bytes:
        return self.nsm.handle(body)


_RSA = rsa.generate_private_key(65537, 2048)


def _enclave(ca: CertificateAuthority, measured: dict[int, bytes] = MEASURED, **kwargs: Any) -> Enclave:
    return Enclave(SimulatedNsm(ca, measured, instance_id="i-0123456789abcdef0", **kwargs), _RSA)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.open(tmp_path_factory.mktemp("ca") / "sim",
                                     now=datetime.now(UTC) - timedelta(days=1))


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[RunningKms]:
    with local_kms(tmp_path_factory.mktemp("kms") / "state", roots=[ca.root_path]) as running:
        yield running


@dataclass
class LockedKey:
    key_id: str
    blob: bytes  # "sealed data", encrypted before the policy was applied


@pytest.fixture(scope="module")
def locked(kms: RunningKms) -> LockedKey:
    """A key whose data was encrypted, then locked with the policy `enclaver trust --kms-policy` writes."""
    admin = kms.client()
    key_id = admin.create_key(Description="enclave data")["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=key_id, Plaintext=b"the no-fly list", EncryptionContext={"app": "nfl"})["CiphertextBlob"]
    document = policy.key_policy(MEASUREMENTS, policy.Trust(ADMIN, PARENT))
    admin.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(document))
    return LockedKey(key_id, blob)


def code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Code"])


def test_the_measured_enclave_gets_ciphertext_for_recipient(kms: RunningKms, ca: CertificateAuthority,
                                                            locked: LockedKey) -> None:
    enclave = _enclave(ca)
    out = kms.client("AKIDPARENT").decrypt(CiphertextBlob=locked.blob, EncryptionContext={"app": "nfl"},
                                           Recipient=enclave.recipient())
    assert "Plaintext" not in out and out["KeyId"] == KEY_ARN_PREFIX + locked.key_id
    assert open_enveloped(out["CiphertextForRecipient"], enclave.key) == b"the no-fly list"


def test_generate_data_key_and_pair_for_the_enclave(kms: RunningKms, ca: CertificateAuthority,
                                                    locked: LockedKey) -> None:
    enclave, parent = _enclave(ca), kms.client("AKIDPARENT")
    out = parent.generate_data_key(KeyId=locked.key_id, KeySpec="AES_256", Recipient=enclave.recipient())
    assert "Plaintext" not in out
    data_key = open_enveloped(out["CiphertextForRecipient"], enclave.key)
    assert len(data_key) == 32
    again = parent.decrypt(CiphertextBlob=out["CiphertextBlob"], Recipient=enclave.recipient())
    assert open_enveloped(again["CiphertextForRecipient"], enclave.key) == data_key
    pair = parent.generate_data_key_pair(KeyId=locked.key_id, KeyPairSpec="ECC_NIST_P256",
                                         Recipient=enclave.recipient())
    assert "PrivateKeyPlaintext" not in pair
    private = serialization.load_der_private_key(open_enveloped(pair["CiphertextForRecipient"], enclave.key), None)
    assert private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == pair["PublicKey"]
    random = parent.generate_random(NumberOfBytes=64, Recipient=enclave.recipient())
    assert "Plaintext" not in random and len(open_enveloped(random["CiphertextForRecipient"], enclave.key)) == 64


def test_derive_shared_secret_for_the_enclave(kms: RunningKms, ca: CertificateAuthority) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    admin = kms.client()
    key_id = admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")["KeyMetadata"]["KeyId"]
    document = policy.key_policy(MEASUREMENTS, policy.Trust(ADMIN, PARENT))
    admin.put_key_policy(KeyId=key_id, Policy=json.dumps(document))
    public = serialization.load_der_public_key(admin.get_public_key(KeyId=key_id)["PublicKey"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(ec.SECP256R1())
    spki = peer.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    enclave, parent = _enclave(ca), kms.client("AKIDPARENT")
    out = parent.derive_shared_secret(KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=spki,
                                      Recipient=enclave.recipient())
    assert "SharedSecret" not in out
    assert open_enveloped(out["CiphertextForRecipient"], enclave.key) == peer.exchange(ec.ECDH(), public)
    with pytest.raises(ClientError) as e:
        parent.derive_shared_secret(KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=spki)
    assert code(e) == "AccessDeniedException"


def _refused(kms: RunningKms, locked: LockedKey, recipient: dict[str, Any] | None, *, validate: bool = True,
             who: str = "AKIDPARENT") -> pytest.ExceptionInfo[ClientError]:
    extra = {"Recipient": recipient} if recipient is not None else {}
    with pytest.raises(ClientError) as e:
        kms.client(who, validate=validate).decrypt(CiphertextBlob=locked.blob, EncryptionContext={"app": "nfl"},
                                                   **extra)
    assert "CiphertextForRecipient" not in e.value.response and "Plaintext" not in e.value.response
    return e


def test_a_changed_pcr0_is_denied(kms: RunningKms, ca: CertificateAuthority, locked: LockedKey) -> None:
    other = _enclave(ca, {**MEASURED, 0: bytes.fromhex("b0" * 48)})
    e = _refused(kms, locked, other.recipient())
    assert code(e) == "AccessDeniedException"
    assert e.value.response["Error"]["Message"] == (
        f"User: {PARENT} is not authorized to perform: kms:Decrypt on resource: {KEY_ARN_PREFIX}{locked.key_id} "
        f"with an explicit deny in a resource-based policy")


def test_a_changed_pcr_the_policy_does_not_pin_still_decrypts(kms: RunningKms, ca: CertificateAuthority,
                                                              locked: LockedKey) -> None:
    """The policy pins PCR0 only (trust's default): PCR1 may change (the control for the test above)."""
    out = kms.client("AKIDPARENT").decrypt(CiphertextBlob=locked.blob, EncryptionContext={"app": "nfl"},
                                           Recipient=_enclave(ca, {**MEASURED, 1: b"\x11" * 48}).recipient())
    assert open_enveloped(out["CiphertextForRecipient"], _RSA) == b"the no-fly list"


def test_a_debug_mode_document_is_denied(kms: RunningKms, ca: CertificateAuthority, locked: LockedKey) -> None:
    assert code(_refused(kms, locked, _enclave(ca, debug_mode=True).recipient())) == "AccessDeniedException"


def test_an_untrusted_ca_is_refused(kms: RunningKms, tmp_path: Path, locked: LockedKey) -> None:
    stranger = CertificateAuthority.open(tmp_path / "other-ca", now=datetime.now(UTC) - timedelta(days=1))
    e = _refused(kms, locked, _enclave(stranger).recipient())
    assert code(e) == "ValidationException" and "root" in e.value.response["Error"]["Message"]


def test_an_expired_document_is_refused(kms: RunningKms, ca: CertificateAuthority, locked: LockedKey) -> None:
    past = datetime.now(UTC) - timedelta(hours=4)  # the leaf lives 3 hours
    enclave = _enclave(ca, clock=past.timestamp)
    e = _refused(kms, locked, enclave.recipient())
    assert code(e) == "ValidationException" and "validity" in e.value.response["Error"]["Message"]


def test_a_forged_document_is_refused(kms: RunningKms, ca: CertificateAuthority, locked: LockedKey) -> None:
    recipient = _enclave(ca).recipient()
    forged = bytearray(recipient["AttestationDocument"])
    forged[-5] ^= 0x01  # inside the signature
    e = _refused(kms, locked, {**recipient, "AttestationDocument": bytes(forged)})
    assert code(e) == "ValidationException"
    e = _refused(kms, locked, {**recipient, "AttestationDocument": b"not cbor"})
    assert code(e) == "ValidationException"


def test_no_recipient_is_denied_by_the_backstop(kms: RunningKms, locked: LockedKey) -> None:
    for who in ("AKIDPARENT", "AKIDADMIN"):
        e = _refused(kms, locked, None, who=who)
        assert code(e) == "AccessDeniedException" and "explicit deny" in e.value.response["Error"]["Message"]


def test_recipient_key_and_algorithm_checks(kms: RunningKms, ca: CertificateAuthority, locked: LockedKey) -> None:
    enclave = _enclave(ca)
    e = _refused(kms, locked, {**enclave.recipient(), "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_1"}, validate=False)
    assert code(e) == "ValidationException" and "keyEncryptionAlgorithm" in e.value.response["Error"]["Message"]
    small = rsa.generate_private_key(65537, 1024).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    e = _refused(kms, locked, enclave.recipient(public_key=small))
    assert code(e) == "ValidationException" and "1024 bits" in e.value.response["Error"]["Message"]
    e = _refused(kms, locked, {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"})
    assert code(e) == "ValidationException"


def test_the_hardening_stops_re_encrypt_and_grants(kms: RunningKms, locked: LockedKey) -> None:
    admin = kms.client()
    destination = admin.create_key()["KeyMetadata"]["KeyId"]
    for who in ("AKIDADMIN", "AKIDPARENT"):
        with pytest.raises(ClientError) as e:
            kms.client(who).re_encrypt(CiphertextBlob=locked.blob, SourceEncryptionContext={"app": "nfl"},
                                       DestinationKeyId=destination)
        assert code(e) == "AccessDeniedException" and "kms:ReEncryptFrom" in e.value.response["Error"]["Message"]
        with pytest.raises(ClientError) as e:
            kms.client(who).create_grant(KeyId=locked.key_id, GranteePrincipal=PARENT, Operations=["Decrypt"])
        assert code(e) == "AccessDeniedException" and "explicit deny" in e.value.response["Error"]["Message"]


def test_malformed_policies_are_refused(kms: RunningKms) -> None:
    admin = kms.client()
    key_id = admin.create_key()["KeyMetadata"]["KeyId"]
    cases = [
        (_policy(_statement(Condition={"StringEquals": {"aws:SourceVpce": "vpce-1"}})), "aws:SourceVpce"),
        (_policy(_statement(Condition={"NumericEquals": {"kms:CallerAccount": "1"}})), "NumericEquals"),
        (_policy(_statement(Principal={"AWS": PARENT})), "will not allow you to update the key policy in the future"),
    ]
    for document, text in cases:
        for call in (lambda d: admin.put_key_policy(KeyId=key_id, Policy=d),
                     lambda d: admin.create_key(Policy=d)):
            with pytest.raises(ClientError) as e:
                call(json.dumps(document))
            assert code(e) == "MalformedPolicyDocumentException" and text in e.value.response["Error"]["Message"]
    duplicated = '{"Version": "2012-10-17", "Statement": [{"Sid": "S", "Effect": "Allow", "Effect": "Deny"}]}'
    with pytest.raises(ClientError) as e:
        admin.put_key_policy(KeyId=key_id, Policy=duplicated)
    assert code(e) == "MalformedPolicyDocumentException" and "twice" in e.value.response["Error"]["Message"]
    # the lock-out check can be bypassed, as in KMS
    admin.put_key_policy(KeyId=key_id, Policy=json.dumps(_policy(_statement(Principal={"AWS": PARENT}))),
                         BypassPolicyLockoutSafetyCheck=True)
    with pytest.raises(ClientError) as e:
        admin.get_key_policy(KeyId=key_id)
    assert code(e) == "AccessDeniedException"
    immutable = policy.key_policy(MEASUREMENTS, policy.Trust(ADMIN, PARENT, immutable=True))
    with pytest.raises(ClientError) as e:
        admin.create_key(Policy=json.dumps(immutable))
    assert code(e) == "MalformedPolicyDocumentException"
    created = admin.create_key(Policy=json.dumps(immutable), BypassPolicyLockoutSafetyCheck=True)["KeyMetadata"]
    with pytest.raises(ClientError) as e:
        admin.put_key_policy(KeyId=created["KeyId"], Policy=json.dumps(policy.default_key_policy(ACCOUNT)))
    assert code(e) == "AccessDeniedException"


def test_the_roots_flag_matters(tmp_path: Path, ca: CertificateAuthority) -> None:
    """Without --attestation-root (AWS's root alone), the simulator's documents are refused."""
    with local_kms(tmp_path / "state") as running:
        parent = running.client("AKIDPARENT")
        with pytest.raises(ClientError) as e:
            parent.generate_random(NumberOfBytes=8, Recipient=_enclave(ca).recipient())
        assert code(e) == "ValidationException"
    with local_kms(tmp_path / "state2", roots=[ca.root_path], aws_root=False) as running:
        assert "roots=sha256:" + ca.fingerprint + " " in running.ready_line
        out = running.client("AKIDPARENT").generate_random(NumberOfBytes=8, Recipient=_enclave(ca).recipient())
        assert len(open_enveloped(out["CiphertextForRecipient"], _RSA)) == 8
