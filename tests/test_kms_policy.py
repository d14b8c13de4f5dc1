"""KMS key policies, judged by the evaluator beside the generator (`kms.evaluate`, IAM's rules from
the AWS docs, kms-recipient notes §3.2): explicit deny wins, an absent condition key makes a
positive operator false and a negated one true, values of one key are ORed, keys and operators
ANDed."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from enclaver_rules.errors import InvalidInput
from enclaver_rules.policy import kms

ACCOUNT = "111122223333"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/KmsAdmin"
PARENT = f"arn:aws:iam::{ACCOUNT}:role/EnclaveParent"
A = {"PCR0": "a" * 96, "PCR1": "1" * 96, "PCR2": "2" * 96}
B = {"PCR0": "b" * 96, "PCR1": "1" * 96, "PCR2": "3" * 96}


def allowed(policy: dict[str, Any], principal: str, action: str, context: dict[str, str],
            grants: tuple[kms.Grant, ...] = ()) -> bool:
    return kms.evaluate(policy, principal, action, context, grants).allowed


def attested(pcrs: dict[str, str]) -> dict[str, str]:
    out = {"kms:RecipientAttestation:ImageSha384": pcrs["PCR0"]}
    out.update({f"kms:RecipientAttestation:{k}": v for k, v in pcrs.items()})
    return out


TRUST = kms.Trust(ADMIN, PARENT)


def test_only_the_measured_enclave_decrypts() -> None:
    policy = kms.key_policy(A, TRUST)
    assert allowed(policy, PARENT, "kms:Decrypt", attested(A))
    assert allowed(policy, PARENT, "kms:GenerateDataKey", attested({**A, "PCR0": A["PCR0"].upper()}))  # any case
    assert not allowed(policy, PARENT, "kms:Decrypt", attested(B))  # another image
    assert not allowed(policy, PARENT, "kms:Decrypt", {})  # unattested: from the parent, outside the enclave
    assert not allowed(policy, ADMIN, "kms:Decrypt", attested(A))  # the admin cannot read
    assert allowed(policy, ADMIN, "kms:PutKeyPolicy", {})  # …but can manage: no lock-out
    assert not allowed(policy, f"arn:aws:iam::{ACCOUNT}:root", "kms:Decrypt", {})


def test_the_policy_is_valid_json_with_plain_sids() -> None:
    policy = json.loads(json.dumps(kms.key_policy(A, TRUST)))
    assert policy["Version"] == "2012-10-17"
    for s in policy["Statement"]:
        assert re.fullmatch(r"[A-Za-z0-9]+", s["Sid"]) and {"Effect", "Principal", "Action", "Resource"} <= set(s)


def test_pinning_more_pcrs_means_all_must_match() -> None:
    policy = kms.key_policy(A, kms.Trust(ADMIN, PARENT, ("PCR0", "PCR1", "PCR2")))
    assert allowed(policy, PARENT, "kms:Decrypt", attested(A))
    assert not allowed(policy, PARENT, "kms:Decrypt", attested({**A, "PCR2": "9" * 96}))


def test_debug_enclaves_and_malformed_measurements_are_refused() -> None:
    with pytest.raises(InvalidInput, match="all zeros"):
        kms.key_policy({"PCR0": kms.DEBUG_PCR}, TRUST)
    assert kms.key_policy({"PCR0": kms.DEBUG_PCR}, kms.Trust(ADMIN, PARENT, allow_debug=True))
    with pytest.raises(InvalidInput, match="96 hex"):
        kms.key_policy({"PCR0": "abc"}, TRUST)
    with pytest.raises(InvalidInput, match="no PCR8"):
        kms.key_policy(A, kms.Trust(ADMIN, PARENT, ("PCR0", "PCR8")))
    with pytest.raises(InvalidInput, match="not an IAM"):
        kms.key_policy(A, kms.Trust("admin", PARENT))
    with pytest.raises(InvalidInput, match="12-digit"):
        kms.Trust.for_account("1234")


def test_update_adds_a_release_keeps_the_old_one_and_never_locks_out() -> None:
    trust = kms.Trust(ADMIN, PARENT, ("PCR0", "PCR2"))
    first = kms.key_policy(A, trust)
    second, diff = kms.update_policy(first, B, trust)
    assert diff and any(line.startswith("+") and "b" * 16 in line for line in diff)
    for pcrs in (A, B):  # rollover: both releases decrypt
        assert allowed(second, PARENT, "kms:Decrypt", attested(pcrs))
    # no cross-combination: PCR0 of one release with PCR2 of the other
    assert not allowed(second, PARENT, "kms:Decrypt", attested({**A, "PCR2": B["PCR2"]}))
    assert not allowed(second, PARENT, "kms:Decrypt", attested({"PCR0": "c" * 96, "PCR2": A["PCR2"]}))
    assert allowed(second, ADMIN, "kms:PutKeyPolicy", {})
    again, _ = kms.update_policy(second, B, trust)  # idempotent
    assert again == second


def test_update_of_a_policy_without_an_admin_adds_one() -> None:
    bare = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Legacy", "Effect": "Allow", "Principal": {"AWS": PARENT}, "Action": "kms:Encrypt", "Resource": "*"}]}
    updated, _ = kms.update_policy(bare, A, TRUST)
    assert allowed(updated, ADMIN, "kms:PutKeyPolicy", {})
    assert allowed(updated, PARENT, "kms:Encrypt", {})  # statements of others are kept
    with pytest.raises(InvalidInput, match="no `Statement`"):
        kms.update_policy({"Version": "2012-10-17"}, A, TRUST)


# -- the evaluator itself: IAM's rules, on small policies written here ----------------------------

KEY = "kms:RecipientAttestation:ImageSha384"


def _policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def _allow(action: Any, principal: Any = "*", condition: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"Sid": "Allow", "Effect": "Allow", "Principal": principal, "Action": action, "Resource": "*",
            **({"Condition": condition} if condition else {}), **extra}


def _deny(action: Any, principal: Any = "*", condition: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**_allow(action, principal, condition), "Sid": "Deny", "Effect": "Deny"}


def test_evaluator_explicit_deny_beats_allow_and_grants() -> None:
    policy = _policy(_allow("kms:*", {"AWS": ADMIN}), _deny("kms:Decrypt"))
    assert kms.evaluate(policy, ADMIN, "kms:Encrypt") == kms.Decision(True, "Allow")
    assert kms.evaluate(policy, ADMIN, "kms:Decrypt") == kms.Decision(False, "denied by Deny")
    grant = kms.Grant(PARENT, frozenset({"Decrypt", "Encrypt"}))
    assert not allowed(policy, PARENT, "kms:Decrypt", {}, (grant,))  # a grant never beats a deny
    assert allowed(policy, PARENT, "kms:Encrypt", {}, (grant,))  # …but allows what nothing denies
    assert not allowed(policy, PARENT, "kms:Encrypt", {})  # no statement, no grant: denied
    assert not allowed(_policy(), ADMIN, "kms:Encrypt", {}, (kms.Grant(PARENT, frozenset({"Encrypt"})),))


def test_evaluator_absent_keys_ifexists_null_and_bool() -> None:
    value = "a" * 96
    positive = _policy(_allow("kms:Decrypt", condition={"StringEqualsIgnoreCase": {KEY: value}}))
    assert allowed(positive, PARENT, "kms:Decrypt", {KEY: value.upper()})
    assert not allowed(positive, PARENT, "kms:Decrypt", {})  # absent: a positive operator is false
    negated = _policy(_allow("kms:*"), _deny("kms:Decrypt", condition={"StringNotEqualsIgnoreCase": {KEY: value}}))
    assert not allowed(negated, PARENT, "kms:Decrypt", {})  # absent: a negated operator is true
    assert allowed(negated, PARENT, "kms:Decrypt", {KEY: value})
    if_exists = _policy(_allow("kms:Decrypt", condition={"StringEqualsIgnoreCaseIfExists": {KEY: value}}))
    assert allowed(if_exists, PARENT, "kms:Decrypt", {})  # why a generated policy never uses …IfExists
    null = _policy(_allow("kms:Decrypt", condition={"Null": {KEY: "false"}}))
    assert allowed(null, PARENT, "kms:Decrypt", {KEY: value}) and not allowed(null, PARENT, "kms:Decrypt", {})
    flag = _policy(_allow("kms:CreateGrant", condition={"Bool": {"kms:GrantIsForAWSResource": True}}))
    assert allowed(flag, PARENT, "kms:CreateGrant", {"kms:grantisforawsresource": "true"})  # names: any case
    assert not allowed(flag, PARENT, "kms:CreateGrant", {}) and not allowed(
        flag, PARENT, "kms:CreateGrant", {"kms:GrantIsForAWSResource": "false"})
    two_keys = _policy(_allow("kms:Decrypt", condition={"StringEquals": {KEY: value, "kms:X": ["1", "2"]}}))
    assert allowed(two_keys, PARENT, "kms:Decrypt", {KEY: value, "kms:X": "2"})  # values ORed
    assert not allowed(two_keys, PARENT, "kms:Decrypt", {KEY: value})  # keys ANDed
    with pytest.raises(ValueError, match="not modelled"):
        kms.evaluate(_policy(_allow("kms:Decrypt", condition={"NumericLessThan": {"kms:X": "1"}})), PARENT,
                     "kms:Decrypt")


def test_evaluator_principals_actions_and_wildcards() -> None:
    policy = _policy(_allow(["kms:ReEncrypt*", "kms:Describe?ey"], {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}))
    other = "arn:aws:iam::444455556666:role/X"
    for action in ("kms:ReEncryptFrom", "KMS:reencryptto", "kms:DescribeKey"):
        assert allowed(policy, ADMIN, action, {})  # root: the account's IAM decides (taken as allowing)
    assert not allowed(policy, ADMIN, "kms:Decrypt", {}) and not allowed(policy, other, "kms:ReEncryptFrom", {})
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/EnclaveParent/i-0123"
    assert allowed(_policy(_allow("kms:Decrypt", {"AWS": PARENT})), session, "kms:Decrypt", {})
    assert allowed(_policy(_allow("kms:Decrypt", {"AWS": [ADMIN, PARENT]})), PARENT, "kms:Decrypt", {})
    not_action = _policy({"Sid": "N", "Effect": "Allow", "Principal": "*", "NotAction": "kms:Decrypt", "Resource": "*"})
    assert allowed(not_action, PARENT, "kms:Encrypt", {}) and not allowed(not_action, PARENT, "kms:Decrypt", {})
    service = _policy(_allow("kms:Decrypt", {"Service": "ec2.amazonaws.com"}))
    assert not allowed(service, PARENT, "kms:Decrypt", {})


# -- attacks on the generated policy: plaintext without attestation ------------------------------

ROOT = f"arn:aws:iam::{ACCOUNT}:root"
OUTSIDER = "arn:aws:iam::444455556666:role/Elsewhere"
#: Written here, not taken from kms: what releases or moves plaintext (see the botocore check below).
PLAINTEXT = ("kms:Decrypt", "kms:ReEncryptFrom", "kms:GenerateDataKey", "kms:GenerateDataKeyPair",
             "kms:DeriveSharedSecret", "kms:Decapsulate")
EVERY_GRANT_OPERATION = frozenset({"Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
                                   "ReEncryptFrom", "ReEncryptTo", "CreateGrant", "RetireGrant", "DescribeKey",
                                   "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext",
                                   "DeriveSharedSecret", "Decapsulate"})


def test_the_admin_cannot_grant_itself_a_way_to_plaintext() -> None:
    """The old admin statement held kms:Create*, so CreateGrant: a grant of ReEncryptFrom to itself,
    then ReEncrypt under a key it owns, and the data is read with no attestation."""
    policy = kms.key_policy(A, kms.Trust(ADMIN, PARENT))
    for who in (ADMIN, PARENT, ROOT, OUTSIDER):
        assert not allowed(policy, who, "kms:CreateGrant", {}), who
        assert not allowed(policy, who, "kms:CreateGrant", attested(A)), who  # not even from the enclave
    # a grant that exists anyway (made before this policy was applied): the backstop still wins
    for who in (ADMIN, PARENT, OUTSIDER):
        grant = (kms.Grant(who, EVERY_GRANT_OPERATION),)
        for action in PLAINTEXT:
            assert not allowed(policy, who, action, {}, grant), (who, action)
            assert not allowed(policy, who, action, attested(B), grant), (who, action)


def test_reencrypt_never_carries_an_attestation_so_it_is_always_denied() -> None:
    policy = kms.key_policy(A, kms.Trust(ADMIN, PARENT))
    for who in (ADMIN, PARENT, ROOT, OUTSIDER):
        for action in ("kms:ReEncryptFrom", "kms:ReEncryptTo"):
            assert kms.evaluate(policy, who, action, {}) == kms.Decision(False, f"denied by {kms.DENY_SID}"), who


def test_every_plaintext_action_needs_the_attestation_even_with_a_grant() -> None:
    policy = kms.key_policy(A, kms.Trust(ADMIN, PARENT))
    grant = (kms.Grant(PARENT, EVERY_GRANT_OPERATION),)
    for action in PLAINTEXT:
        assert not allowed(policy, PARENT, action, {}, grant), action  # the parent, outside the enclave
        assert not allowed(policy, PARENT, action, attested(B), grant), action  # another image
    for action in ("kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyPair", "kms:DeriveSharedSecret"):
        assert allowed(policy, PARENT, action, attested(A)), action  # the enclave
    # the *WithoutPlaintext variants are left to whoever is allowed them: what they return is
    # ciphertext under this key, and opening it is Decrypt, which only the enclave gets
    pipeline = f"arn:aws:iam::{ACCOUNT}:role/ReleasePipeline"
    policy["Statement"].append({"Sid": "PipelineEncryptsOnly", "Effect": "Allow", "Principal": {"AWS": pipeline},
                                "Action": ["kms:Encrypt", "kms:GenerateDataKeyWithoutPlaintext",
                                           "kms:GenerateDataKeyPairWithoutPlaintext"], "Resource": "*"})
    assert allowed(policy, pipeline, "kms:GenerateDataKeyWithoutPlaintext", {})
    assert kms.plaintext_paths(policy, pipeline) == []
    assert not allowed(policy, ADMIN, "kms:GenerateDataKeyWithoutPlaintext", {})


def test_the_only_way_left_to_the_admin_is_replacing_the_policy_and_immutable_closes_it() -> None:
    mutable = kms.key_policy(A, kms.Trust(ADMIN, PARENT))
    assert kms.plaintext_paths(mutable, ADMIN) == ["kms:PutKeyPolicy"]  # the trust that remains, documented
    assert kms.plaintext_paths(mutable, PARENT) == []
    assert kms.plaintext_paths(mutable, OUTSIDER, (kms.Grant(OUTSIDER, EVERY_GRANT_OPERATION),)) == []
    frozen = kms.key_policy(A, kms.Trust(ADMIN, PARENT, immutable=True))
    for who in (ADMIN, PARENT, ROOT, OUTSIDER, f"arn:aws:sts::{ACCOUNT}:assumed-role/KmsAdmin/s"):
        assert kms.plaintext_paths(frozen, who) == [], who
        assert not allowed(frozen, who, "kms:PutKeyPolicy", {}), who
    assert allowed(frozen, ADMIN, "kms:DescribeKey", {}) and allowed(frozen, ADMIN, "kms:ScheduleKeyDeletion", {})
    text = json.dumps(frozen)
    assert "kms:Put*" not in text and "kms:*" not in text
    assert any(s["Effect"] == "Deny" and s["Action"] == "kms:PutKeyPolicy" and s["Principal"] == "*"
               for s in frozen["Statement"])
    # the root as admin (the default): the account's IAM could act as it, and still cannot change it
    by_root = kms.key_policy(A, kms.Trust.for_account(ACCOUNT, immutable=True))
    assert kms.plaintext_paths(by_root, ADMIN) == [] and kms.plaintext_paths(by_root, ROOT) == []


def test_the_admin_statement_holds_no_way_to_use_the_key() -> None:
    admin = kms.key_policy(A, kms.Trust(ADMIN, PARENT))["Statement"][0]
    assert admin["Sid"] == kms.ADMIN_SID
    for action in (*PLAINTEXT, "kms:CreateGrant", "kms:ReplicateKey", "kms:Encrypt", "kms:ReEncryptTo"):
        assert not any(re.fullmatch(p.replace("*", ".*"), action) for p in admin["Action"]), action
    assert "kms:CreateAlias" in admin["Action"]


def test_update_closes_grants_and_reencrypt_in_an_older_policy() -> None:
    trust = kms.Trust(ADMIN, PARENT)
    older = kms.key_policy(A, trust)  # what enclaver wrote before: kms:Create* and a narrower backstop
    older["Statement"][0]["Action"] = ["kms:Create*", *older["Statement"][0]["Action"][1:]]
    older["Statement"] = [s for s in older["Statement"] if s["Sid"] != kms.NO_GRANTS_SID]
    older["Statement"][-1]["Action"] = ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyPair",
                                        "kms:DeriveSharedSecret"]
    older["Statement"].append({"Sid": "Legacy", "Effect": "Allow", "Principal": {"AWS": ADMIN},
                               "Action": "kms:CreateGrant", "Resource": "*"})
    assert kms.plaintext_paths(older, ADMIN) != ["kms:PutKeyPolicy"]  # the hole, in the older policy
    updated, _ = kms.update_policy(older, B, trust)
    assert kms.plaintext_paths(updated, ADMIN) == ["kms:PutKeyPolicy"]
    assert not allowed(updated, ADMIN, "kms:CreateGrant", {})  # the legacy allow is overridden
    for pcrs in (A, B):
        assert allowed(updated, PARENT, "kms:Decrypt", attested(pcrs))
    with pytest.raises(InvalidInput, match="immutable"):
        kms.update_policy(updated, B, kms.Trust(ADMIN, PARENT, immutable=True))
    frozen = kms.key_policy(A, kms.Trust(ADMIN, PARENT, immutable=True))
    with pytest.raises(InvalidInput, match="is immutable"):
        kms.update_policy(frozen, B, trust)


def test_the_backstop_covers_every_kms_operation_that_returns_a_secret() -> None:
    """Checked against botocore's KMS model: an operation whose answer carries a plaintext, a
    private key or a shared secret must be denied without the attestation, unless it is one of
    the reasoned exceptions (GenerateRandom: no key; Encapsulate: a public-key operation)."""
    import gzip
    from pathlib import Path

    import botocore

    model_path = Path(botocore.__file__).parent / "data" / "kms" / "2014-11-01" / "service-2.json.gz"
    model = json.loads(gzip.decompress(model_path.read_bytes()))
    secret_fields = {"Plaintext", "PrivateKeyPlaintext", "SharedSecret"}
    returning_secrets = {f"kms:{name}" for name, op in model["operations"].items()
                         if secret_fields & set(model["shapes"].get(op.get("output", {}).get("shape", ""), {})
                                                .get("members", {}))}
    expected = (returning_secrets - {"kms:GenerateRandom", "kms:Encapsulate"}) | {"kms:ReEncryptFrom"}
    assert expected == set(PLAINTEXT) == set(kms.PLAINTEXT_OPERATIONS)
    assert set(model["shapes"]["GrantOperation"]["enum"]) == set(kms.GRANT_OPERATIONS)
    policy = kms.key_policy(A, kms.Trust(ADMIN, PARENT))
    for action in expected:
        assert kms.evaluate(policy, PARENT, action, {}).why == f"denied by {kms.DENY_SID}", action
