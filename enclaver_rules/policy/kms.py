"""KMS key policies that let exactly one measured enclave image decrypt. Pure: dicts in, dicts out.

The shape follows the KMS notes (§3 of `kms-recipient.md`, from the AWS condition-key docs):

- an **admin** statement with the key-management actions and no `Decrypt`, so the admin passes
  KMS's lock-out check but cannot read data;
- one **allow** statement per enclave image: the decrypt-side actions, only when
  `kms:RecipientAttestation:ImageSha384` (PCR0) — and optionally PCR1, PCR2, PCR8 — match, with
  `StringEqualsIgnoreCase` (an absent key makes it false, so unattested calls never match).
  One statement per image, not one list per key: values of one key are ORed and keys ANDed, so a
  shared statement would admit PCR0 of one release with PCR2 of another;
- a **deny** backstop for every principal when PCR0 is none of the trusted images
  (`StringNotEqualsIgnoreCase` is true when the key is absent, so it also stops unattested calls
  and any IAM grant of Decrypt).

A debug-mode enclave reports PCRs of all zeros; trusting that would trust any code, so it is
refused unless explicitly allowed.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from enclaver_rules.errors import InvalidInput

DECRYPT_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyPair", "kms:DeriveSharedSecret")
ADMIN_ACTIONS = ("kms:Create*", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*", "kms:Update*", "kms:Revoke*",
                 "kms:Disable*", "kms:Get*", "kms:Delete*", "kms:TagResource", "kms:UntagResource",
                 "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion")
ADMIN_SID = "KeyAdministrationNoUse"
DENY_SID = "NoPlaintextOutsideTrustedEnclaves"
ALLOW_PREFIX = "EnclaveMayDecrypt"
CONDITION = "kms:RecipientAttestation:"
IMAGE_KEY = CONDITION + "ImageSha384"
PCR_NAMES = ("PCR0", "PCR1", "PCR2", "PCR8")
DEBUG_PCR = "0" * 96
_PCR = re.compile(r"[0-9a-f]{96}")
_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:(root|(role|user)/[\w+=,.@/-]+)")


ACCOUNT_VARIABLE = "ENC_KMS_ACCOUNT"
ADMIN_VARIABLE = "ENC_KMS_ADMIN"
PRINCIPAL_VARIABLE = "ENC_KMS_PRINCIPAL"
VARIABLES = (ACCOUNT_VARIABLE, ADMIN_VARIABLE, PRINCIPAL_VARIABLE)
_ACCOUNT = re.compile(r"\d{12}")


@dataclass(frozen=True, slots=True)
class Trust:
    """Who may do what: the key's admin and the principal the enclave's parent instance runs as."""

    admin: str
    principal: str
    pcrs: tuple[str, ...] = ("PCR0",)  # which measurements the allow statement pins (PCR0 always)
    allow_debug: bool = False

    @classmethod
    def for_account(cls, account: str, admin: str | None = None, principal: str | None = None,
                    pcrs: Sequence[str] = ("PCR0",), allow_debug: bool = False, *,
                    names: tuple[str, str, str] = ("--account", "--admin", "--principal")) -> Trust:
        """Admin and principal default to the account root. `names` are where each value came from
        (a flag or an ENC_KMS_* variable), so an error names the thing to change."""
        account_name, admin_name, principal_name = names
        if not _ACCOUNT.fullmatch(account):
            raise InvalidInput(f"account {account!r} is not a 12-digit AWS account ID", field=account_name,
                               fix="give the account that owns the key, e.g. 111122223333")
        root = f"arn:aws:iam::{account}:root"
        return cls(check_arn(admin, admin_name) if admin else root,
                   check_arn(principal, principal_name) if principal else root, tuple(pcrs), allow_debug)


def trust_from(environ: Mapping[str, str], *, account: str | None = None, admin: str | None = None,
               principal: str | None = None, pcrs: Sequence[str] = ("PCR0",), allow_debug: bool = False,
               flags: bool = False) -> Trust:
    """The one rule `enclaver trust` (`flags`) and task `trust:<name>` share: account, admin and
    principal each from its flag when given, else from ENC_KMS_ACCOUNT, ENC_KMS_ADMIN,
    ENC_KMS_PRINCIPAL. No account is an error, never a placeholder: a policy naming an account
    nobody owns looks finished, and fails only when someone tries to apply it."""
    def pick(value: str | None, flag: str, variable: str) -> tuple[str | None, str]:
        return (value, flag) if value else (environ.get(variable) or None, variable)

    account, account_name = pick(account, "--account", ACCOUNT_VARIABLE)
    admin, admin_name = pick(admin, "--admin", ADMIN_VARIABLE)
    principal, principal_name = pick(principal, "--principal", PRINCIPAL_VARIABLE)
    if account is None:
        fix = (f"add --account <12-digit AWS account ID>, or set {ACCOUNT_VARIABLE}" if flags else
               f"set {ACCOUNT_VARIABLE}=<12-digit AWS account ID> (and {PRINCIPAL_VARIABLE})")
        raise InvalidInput("a KMS key policy needs the AWS account that owns the key",
                           field="--account" if flags else ACCOUNT_VARIABLE, fix=fix)
    return Trust.for_account(account, admin, principal, pcrs, allow_debug,
                             names=(account_name, admin_name, principal_name))


def check_arn(arn: str, flag: str) -> str:
    """`arn`, if it names an IAM role, user or account root; `flag` is where it came from."""
    if not _ARN.fullmatch(arn):
        raise InvalidInput(f"{arn!r} is not an IAM role, user or account-root ARN", field=flag,
                           fix="e.g. arn:aws:iam::111122223333:role/EnclaveParent")
    return arn


def check_measurements(measurements: Mapping[str, str], trust: Trust) -> dict[str, str]:
    """The PCRs the policy pins, lower-case, each 96 hex characters; all-zero (debug) refused."""
    if "PCR0" not in trust.pcrs:
        raise InvalidInput("a key policy must pin PCR0 (kms:RecipientAttestation:ImageSha384)", field="--pcr",
                           fix="include PCR0")
    out = {}
    for name in trust.pcrs:
        if name not in PCR_NAMES:
            raise InvalidInput(f"{name} cannot be pinned here", field="--pcr", fix=f"use {', '.join(PCR_NAMES)}")
        value = measurements.get(name)
        if value is None:
            raise InvalidInput(f"the measurements have no {name}", field=name,
                               fix="PCR8 exists only for signed EIFs (manifest `signature`); drop it from --pcr")
        value = value.lower()
        if not _PCR.fullmatch(value):
            raise InvalidInput(f"{name} is not 96 hex characters (SHA-384): {value[:20]}…", field=name,
                               fix="use the values `enclaver trust` or `nitro-cli describe-eif` print")
        if value == DEBUG_PCR and not trust.allow_debug:
            raise InvalidInput(f"{name} is all zeros: a debug-mode enclave, whose measurements prove nothing",
                               field=name, fix="build a production enclave, or pass --allow-debug for a test key")
        out[name] = value
    return out


def allow_statement(pcrs: Mapping[str, str], principal: str) -> dict[str, Any]:
    conditions = {IMAGE_KEY: pcrs["PCR0"]}
    conditions.update({CONDITION + name: value for name, value in pcrs.items() if name != "PCR0"})
    return {"Sid": ALLOW_PREFIX + pcrs["PCR0"][:16], "Effect": "Allow", "Principal": {"AWS": principal},
            "Action": list(DECRYPT_ACTIONS), "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": conditions}}


def deny_statement(image_digests: Sequence[str]) -> dict[str, Any]:
    return {"Sid": DENY_SID, "Effect": "Deny", "Principal": "*", "Action": list(DECRYPT_ACTIONS), "Resource": "*",
            "Condition": {"StringNotEqualsIgnoreCase": {IMAGE_KEY: sorted(set(image_digests))}}}


def admin_statement(admin: str) -> dict[str, Any]:
    return {"Sid": ADMIN_SID, "Effect": "Allow", "Principal": {"AWS": admin}, "Action": list(ADMIN_ACTIONS),
            "Resource": "*"}


def key_policy(measurements: Mapping[str, str], trust: Trust) -> dict[str, Any]:
    pcrs = check_measurements(measurements, trust)
    return {"Version": "2012-10-17", "Id": "enclaver-enclave-key",
            "Statement": [admin_statement(check_arn(trust.admin, "--admin")),
                          allow_statement(pcrs, check_arn(trust.principal, "--principal")),
                          deny_statement([pcrs["PCR0"]])]}


def _can_manage_policy(statement: Mapping[str, Any]) -> bool:
    if statement.get("Effect") != "Allow":
        return False
    actions = statement.get("Action", [])
    actions = [actions] if isinstance(actions, str) else actions
    return any(a in ("kms:*", "kms:Put*", "kms:PutKeyPolicy", "*") for a in actions)


def update_policy(existing: Mapping[str, Any], measurements: Mapping[str, str],
                  trust: Trust) -> tuple[dict[str, Any], list[str]]:
    """Add an enclave image to an existing policy for a rollover: the previous images' allow
    statements stay, the deny backstop lists every trusted PCR0, and statements that let someone
    manage the key are never removed (no lock-out). Returns the new policy and a unified diff."""
    if not isinstance(existing.get("Statement"), list):
        raise InvalidInput("the policy to update has no `Statement` list", field="--update",
                           fix="pass a KMS key policy document (aws kms get-key-policy --output text)")
    pcrs = check_measurements(measurements, trust)
    policy = copy.deepcopy(dict(existing))
    statements: list[dict[str, Any]] = policy["Statement"]
    trusted = [pcrs["PCR0"]]
    for statement in statements:
        if str(statement.get("Sid", "")).startswith(ALLOW_PREFIX):
            value = statement.get("Condition", {}).get("StringEqualsIgnoreCase", {}).get(IMAGE_KEY)
            trusted += [value] if isinstance(value, str) else list(value or [])
    new_allow = allow_statement(pcrs, check_arn(trust.principal, "--principal"))
    kept = [s for s in statements if s.get("Sid") not in (DENY_SID, new_allow["Sid"])]
    if not any(_can_manage_policy(s) for s in kept):
        kept.insert(0, admin_statement(check_arn(trust.admin, "--admin")))
    policy["Statement"] = kept + [new_allow, deny_statement(trusted)]
    before = json.dumps(existing, indent=2, sort_keys=True).splitlines()
    after = json.dumps(policy, indent=2, sort_keys=True).splitlines()
    diff = list(difflib.unified_diff(before, after, "policy (before)", "policy (after)", lineterm=""))
    return policy, diff
