"""KMS key policies, judged by a small evaluator of IAM's rules written here from the AWS docs
(kms-recipient notes §3.2): explicit deny wins, an absent condition key makes a positive operator
false and a negated one true, values of one key are ORed, keys and operators ANDed."""

from __future__ import annotations

import fnmatch
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


def _listify(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _condition_holds(condition: dict[str, dict[str, Any]], context: dict[str, str]) -> bool:
    for operator, keys in condition.items():
        for key, values in keys.items():
            wanted = [str(v).lower() for v in _listify(values)]
            present = key in context
            if operator == "StringEqualsIgnoreCase":
                if not present or context[key].lower() not in wanted:
                    return False
            elif operator == "StringNotEqualsIgnoreCase":
                if present and context[key].lower() in wanted:
                    return False
            else:
                raise AssertionError(f"operator {operator} not modelled")
    return True


def allowed(policy: dict[str, Any], principal: str, action: str, context: dict[str, str]) -> bool:
    decision = False
    for s in policy["Statement"]:
        who = s["Principal"]
        if who != "*" and principal not in _listify(who["AWS"]):
            continue
        if not any(fnmatch.fnmatchcase(action, pattern) for pattern in _listify(s["Action"])):
            continue
        if not _condition_holds(s.get("Condition", {}), context):
            continue
        if s["Effect"] == "Deny":
            return False
        decision = True
    return decision


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
