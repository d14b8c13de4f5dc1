"""KMS key policies that let exactly one measured enclave image decrypt. Pure: dicts in, dicts out.

The shape follows the KMS notes (§3 of `kms-recipient.md`, from the AWS condition-key docs):

- an **admin** statement with the key-management actions and no `Decrypt`, so the admin passes
  KMS's lock-out check but cannot read data. It names `kms:CreateAlias`, not `kms:Create*`: that
  would include `kms:CreateGrant`, and a grant to itself is a way to use the key;
- one **allow** statement per enclave image: the decrypt-side actions, only when
  `kms:RecipientAttestation:ImageSha384` (PCR0) — and optionally PCR1, PCR2, PCR8 — match, with
  `StringEqualsIgnoreCase` (an absent key makes it false, so unattested calls never match).
  One statement per image, not one list per key: values of one key are ORed and keys ANDed, so a
  shared statement would admit PCR0 of one release with PCR2 of another;
- a **deny** backstop for every principal, for every action that releases or moves plaintext
  (`PLAINTEXT_ACTIONS`), when PCR0 is none of the trusted images (`StringNotEqualsIgnoreCase` is
  true when the key is absent, so it also stops unattested calls, any IAM policy and any grant:
  an explicit deny in the key policy beats a grant's allow, see `evaluate`). `ReEncrypt*` never
  carries an attestation, so it is always denied: without that, `ReEncryptFrom` (held, say,
  through a grant) re-encrypts the data under a key its caller controls, who then reads it;
- a deny of `kms:CreateGrant` and `kms:ReplicateKey` for everyone: a grant cannot release
  plaintext past the backstop, but it can let another principal (another account's instance
  running the same enclave image) use the key, and a multi-Region replica shares the key
  material under a policy its creator chooses.

What is still trusted: the key administrator can replace the whole policy (`kms:PutKeyPolicy`),
and then grant itself anything; so can whoever the account's IAM lets act as the administrator
when the administrator is the account root (the default). `Trust.immutable` (`enclaver trust
--immutable`, ENC_KMS_IMMUTABLE=1) closes that: no statement allows `kms:PutKeyPolicy` and one
denies it to everyone, so once applied nobody can change the policy again (`LOCKOUT_WARNING`).
The administrator can still disable the key or schedule its deletion (availability, not
confidentiality), and grants made before the policy was applied stay (`aws kms list-grants`;
they are still bound by the backstop).

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
#: Every KMS action that gives its caller plaintext, or moves it out of this key's protection;
#: checked against botocore's KMS model (1.44, 56 operations) in the tests. Each, and the near
#: misses:
#: - Decrypt (Plaintext), GenerateDataKey (Plaintext), GenerateDataKeyPair (PrivateKeyPlaintext),
#:   DeriveSharedSecret (SharedSecret), Decapsulate (SharedSecret, ML-KEM keys; it takes no
#:   attestation, so it is always denied): they return the secret;
#: - ReEncrypt* (ReEncryptFrom: decrypts inside KMS and encrypts under a key the caller names,
#:   which may be its own; ReEncryptTo only moves other keys' data in, denied with it so the
#:   backstop stays one pattern: decrypt in the enclave and encrypt instead);
#: - not GenerateDataKeyWithoutPlaintext or GenerateDataKeyPairWithoutPlaintext: they return a
#:   data key (private key) encrypted under this key, i.e. ciphertext only Decrypt opens (and a
#:   public key, which is public); not Encrypt (plaintext in, ciphertext out); not Encapsulate
#:   (a public-key operation anyone can run with GetPublicKey's key: a new secret, nothing
#:   kept is released); not GenerateRandom (no key involved: IAM policies alone govern it);
#:   not Sign/Verify/GenerateMac/VerifyMac (signatures and MACs, no data).
PLAINTEXT_ACTIONS = ("kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey", "kms:GenerateDataKeyPair",
                     "kms:DeriveSharedSecret", "kms:Decapsulate")
#: The IAM actions PLAINTEXT_ACTIONS names (ReEncrypt is authorised as ReEncryptFrom on the source key).
PLAINTEXT_OPERATIONS = ("kms:Decrypt", "kms:ReEncryptFrom", "kms:GenerateDataKey", "kms:GenerateDataKeyPair",
                        "kms:DeriveSharedSecret", "kms:Decapsulate")
ADMIN_ACTIONS = ("kms:CreateAlias", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*", "kms:Update*",
                 "kms:Revoke*", "kms:Disable*", "kms:Get*", "kms:Delete*", "kms:TagResource", "kms:UntagResource",
                 "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion")
#: Denied to everyone, always (see the module note).
NO_GRANT_ACTIONS = ("kms:CreateGrant", "kms:ReplicateKey")
ADMIN_SID = "KeyAdministrationNoUse"
DENY_SID = "NoPlaintextOutsideTrustedEnclaves"
NO_GRANTS_SID = "NoGrantsNoReplicas"
IMMUTABLE_SID = "NobodyMayChangeThisPolicy"
LOCKOUT_WARNING = (
    "this key policy is immutable: no statement allows kms:PutKeyPolicy and one denies it to everyone, so once "
    "it is applied nobody (not the key administrator, not the account root) can change it again: a later release "
    "needs a new key, and a mistake in it cannot be fixed. KMS refuses such a policy unless it is applied with "
    "--bypass-policy-lockout-safety-check (aws kms put-key-policy / create-key). The administrator can still "
    "disable the key or schedule its deletion.")
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
IMMUTABLE_VARIABLE = "ENC_KMS_IMMUTABLE"
VARIABLES = (ACCOUNT_VARIABLE, ADMIN_VARIABLE, PRINCIPAL_VARIABLE, IMMUTABLE_VARIABLE)
_ACCOUNT = re.compile(r"\d{12}")


@dataclass(frozen=True, slots=True)
class Trust:
    """Who may do what: the key's admin and the principal the enclave's parent instance runs as."""

    admin: str
    principal: str
    pcrs: tuple[str, ...] = ("PCR0",)  # which measurements the allow statement pins (PCR0 always)
    allow_debug: bool = False
    immutable: bool = False  # nobody may change the policy once applied (LOCKOUT_WARNING)

    @classmethod
    def for_account(cls, account: str, admin: str | None = None, principal: str | None = None,
                    pcrs: Sequence[str] = ("PCR0",), allow_debug: bool = False, *, immutable: bool = False,
                    names: tuple[str, str, str] = ("--account", "--admin", "--principal")) -> Trust:
        """Admin and principal default to the account root. `names` are where each value came from
        (a flag or an ENC_KMS_* variable), so an error names the thing to change."""
        account_name, admin_name, principal_name = names
        if not _ACCOUNT.fullmatch(account):
            raise InvalidInput(f"account {account!r} is not a 12-digit AWS account ID", field=account_name,
                               fix="give the account that owns the key, e.g. 111122223333")
        root = f"arn:aws:iam::{account}:root"
        return cls(check_arn(admin, admin_name) if admin else root,
                   check_arn(principal, principal_name) if principal else root, tuple(pcrs), allow_debug, immutable)


def immutable_from(environ: Mapping[str, str]) -> bool:
    """ENC_KMS_IMMUTABLE: 1/true/yes asks for an immutable policy; unset, empty, 0/false/no not."""
    value = environ.get(IMMUTABLE_VARIABLE, "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("", "0", "false", "no"):
        return False
    raise InvalidInput(f"{value!r} is neither 1 nor 0", field=IMMUTABLE_VARIABLE,
                       fix="set it to 1 for a policy nobody can change once applied, else unset it")


def trust_from(environ: Mapping[str, str], *, account: str | None = None, admin: str | None = None,
               principal: str | None = None, pcrs: Sequence[str] = ("PCR0",), allow_debug: bool = False,
               immutable: bool = False, flags: bool = False) -> Trust:
    """The one rule `enclaver trust` (`flags`) and task `trust:<name>` share: account, admin and
    principal each from its flag when given, else from ENC_KMS_ACCOUNT, ENC_KMS_ADMIN,
    ENC_KMS_PRINCIPAL; immutable when `immutable` (--immutable) or ENC_KMS_IMMUTABLE=1. No
    account is an error, never a placeholder: a policy naming an account nobody owns looks
    finished, and fails only when someone tries to apply it."""
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
                             immutable=immutable or immutable_from(environ),
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
    return {"Sid": DENY_SID, "Effect": "Deny", "Principal": "*", "Action": list(PLAINTEXT_ACTIONS), "Resource": "*",
            "Condition": {"StringNotEqualsIgnoreCase": {IMAGE_KEY: sorted(set(image_digests))}}}


def no_grants_statement() -> dict[str, Any]:
    return {"Sid": NO_GRANTS_SID, "Effect": "Deny", "Principal": "*", "Action": list(NO_GRANT_ACTIONS),
            "Resource": "*"}


def immutable_statement() -> dict[str, Any]:
    return {"Sid": IMMUTABLE_SID, "Effect": "Deny", "Principal": "*", "Action": "kms:PutKeyPolicy", "Resource": "*"}


def admin_statement(admin: str, immutable: bool = False) -> dict[str, Any]:
    actions = [a for a in ADMIN_ACTIONS if not (immutable and a == "kms:Put*")]  # Put* is PutKeyPolicy alone
    return {"Sid": ADMIN_SID, "Effect": "Allow", "Principal": {"AWS": admin}, "Action": actions, "Resource": "*"}


def key_policy(measurements: Mapping[str, str], trust: Trust) -> dict[str, Any]:
    pcrs = check_measurements(measurements, trust)
    statements = [admin_statement(check_arn(trust.admin, "--admin"), trust.immutable),
                  allow_statement(pcrs, check_arn(trust.principal, "--principal")),
                  deny_statement([pcrs["PCR0"]]), no_grants_statement()]
    if trust.immutable:
        statements.append(immutable_statement())
    return {"Version": "2012-10-17", "Id": "enclaver-enclave-key", "Statement": statements}


def _can_manage_policy(statement: Mapping[str, Any]) -> bool:
    if statement.get("Effect") != "Allow":
        return False
    actions = statement.get("Action", [])
    actions = [actions] if isinstance(actions, str) else actions
    return any(a in ("kms:*", "kms:Put*", "kms:PutKeyPolicy", "*") for a in actions)


def update_policy(existing: Mapping[str, Any], measurements: Mapping[str, str],
                  trust: Trust) -> tuple[dict[str, Any], list[str]]:
    """Add an enclave image to an existing policy for a rollover: the previous images' allow
    statements stay, the deny backstop lists every trusted PCR0 (and covers every action of
    PLAINTEXT_ACTIONS, however old the policy), grants and replicas are denied, an older
    enclaver's admin statement loses `kms:Create*` (so CreateGrant), and statements that let
    someone manage the key are never removed (no lock-out). Returns the new policy and a unified
    diff."""
    if not isinstance(existing.get("Statement"), list):
        raise InvalidInput("the policy to update has no `Statement` list", field="--update",
                           fix="pass a KMS key policy document (aws kms get-key-policy --output text)")
    if trust.immutable:
        raise InvalidInput("an immutable policy is written whole, never merged into an existing one",
                           field="--immutable", fix="drop --update (a new key for this release), or drop --immutable")
    if any(s.get("Sid") == IMMUTABLE_SID for s in existing["Statement"]):
        raise InvalidInput("the policy to update is immutable: KMS refuses any change to it", field="--update",
                           fix="put this release's data under a new key (enclaver trust --kms-policy)")
    pcrs = check_measurements(measurements, trust)
    policy = copy.deepcopy(dict(existing))
    statements: list[dict[str, Any]] = policy["Statement"]
    for statement in statements:
        if statement.get("Sid") == ADMIN_SID:  # an older enclaver's admin held kms:Create*, so CreateGrant
            statement["Action"] = list(ADMIN_ACTIONS)
    trusted = [pcrs["PCR0"]]
    for statement in statements:
        if str(statement.get("Sid", "")).startswith(ALLOW_PREFIX):
            value = statement.get("Condition", {}).get("StringEqualsIgnoreCase", {}).get(IMAGE_KEY)
            trusted += [value] if isinstance(value, str) else list(value or [])
    new_allow = allow_statement(pcrs, check_arn(trust.principal, "--principal"))
    kept = [s for s in statements if s.get("Sid") not in (DENY_SID, NO_GRANTS_SID, new_allow["Sid"])]
    if not any(_can_manage_policy(s) for s in kept):
        kept.insert(0, admin_statement(check_arn(trust.admin, "--admin")))
    policy["Statement"] = kept + [new_allow, deny_statement(trusted), no_grants_statement()]
    before = json.dumps(existing, indent=2, sort_keys=True).splitlines()
    after = json.dumps(policy, indent=2, sort_keys=True).splitlines()
    diff = list(difflib.unified_diff(before, after, "policy (before)", "policy (after)", lineterm=""))
    return policy, diff


# -- evaluation ----------------------------------------------------------------------------------
# Beside the generator, so a test can prove what a generated policy admits. A small evaluator of
# the part of IAM's logic these policies use, written here because nothing offline evaluates a
# key policy's attestation conditions (moto ignores conditions: kms-recipient notes §5.1).

#: The grant operations KMS accepts (botocore's `GrantOperation`, 1.44).
GRANT_OPERATIONS = ("Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "ReEncryptFrom",
                    "ReEncryptTo", "Sign", "Verify", "GetPublicKey", "CreateGrant", "RetireGrant", "DescribeKey",
                    "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", "GenerateMac", "VerifyMac",
                    "DeriveSharedSecret", "Encapsulate", "Decapsulate")
_NEGATED = ("StringNotEquals", "StringNotEqualsIgnoreCase", "StringNotLike")
_OPERATORS = ("StringEquals", "StringEqualsIgnoreCase", "StringLike", *_NEGATED, "Bool", "Null")
_SESSION = re.compile(r"arn:(aws[a-z-]*):sts::(\d{12}):assumed-role/([\w+=,.@-]+)/.+")
_ACCOUNT_OF = re.compile(r"arn:aws[a-z-]*:(?:iam|sts)::(\d{12}):.+")


@dataclass(frozen=True, slots=True)
class Grant:
    """A KMS grant on the key: `grantee` may call `operations` (grant operation names, e.g.
    "Decrypt"), unless the key policy denies it."""

    grantee: str
    operations: frozenset[str]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    why: str  # the deciding statement's Sid, "grant", or what was missing

    @property
    def explicit_deny(self) -> bool:
        """Refused by a Deny statement (not merely for want of an Allow): AWS words the two apart."""
        return not self.allowed and self.why.startswith("denied by ")


def _listify(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _glob(pattern: str, text: str, *, case: bool) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, 0 if case else re.IGNORECASE) is not None


def _caller(principal: str) -> str:
    """An assumed-role session acts as its role (what a key policy names)."""
    m = _SESSION.fullmatch(principal)
    return f"arn:{m.group(1)}:iam::{m.group(2)}:role/{m.group(3)}" if m else principal


def _principal_matches(who: Any, principal: str) -> bool:
    """`"*"` matches everyone. An account's root ARN matches every principal of that account: in a
    key policy it hands the decision to the account's IAM policies, which this evaluator takes
    to allow whatever they are asked (the worst case: the account's IAM administrators)."""
    if who == "*":
        return True
    if not isinstance(who, dict):
        raise ValueError(f"Principal {who!r} is not modelled")
    caller = _caller(principal)
    account = _ACCOUNT_OF.fullmatch(caller)
    for arn in _listify(who.get("AWS", [])):
        if arn in ("*", caller):
            return True
        root = re.fullmatch(r"arn:aws[a-z-]*:iam::(\d{12}):root|(\d{12})", str(arn))  # an account ID means its root
        if root and account and (root.group(1) or root.group(2)) == account.group(1):
            return True
    return False  # Service and federated principals are never an IAM caller here


def _condition_holds(condition: Mapping[str, Mapping[str, Any]], context: Mapping[str, str]) -> bool:
    """IAM's rules (AWS doc: IAM JSON policy elements: Condition operators): keys under one
    operator, and operators, are ANDed; values of one key ORed (a negated operator: NOR); an
    absent key makes a positive operator false and a negated one true; `…IfExists` is true when
    the key is absent; `Null` tests presence. Key names are case-insensitive."""
    present = {k.lower(): v for k, v in context.items()}
    for raw_operator, keys in condition.items():
        operator = raw_operator.removesuffix("IfExists")
        if_exists = operator != raw_operator
        if operator not in _OPERATORS:
            raise ValueError(f"condition operator {raw_operator} is not modelled")
        for key, values in keys.items():
            wanted = [str(v).lower() if isinstance(v, bool) else str(v) for v in _listify(values)]
            value = present.get(key.lower())
            if operator == "Null":
                if (value is None) != (wanted[0].lower() == "true"):
                    return False
                continue
            if value is None:
                if if_exists or operator in _NEGATED:
                    continue
                return False
            if operator == "Bool" or operator.endswith("IgnoreCase"):
                hit = value.lower() in [w.lower() for w in wanted]
            elif operator.endswith("Like"):
                hit = any(_glob(w, value, case=True) for w in wanted)
            else:
                hit = value in wanted
            if hit == (operator in _NEGATED):
                return False
    return True


def _applies(statement: Mapping[str, Any], principal: str, action: str, context: Mapping[str, str],
             resource: str | None = None) -> bool:
    if "NotPrincipal" in statement or "NotResource" in statement:
        raise ValueError(f"statement {statement.get('Sid', '?')}: NotPrincipal/NotResource are not modelled")
    if not _principal_matches(statement.get("Principal"), principal):
        return False
    if "Resource" not in statement:  # accepted by KMS, but "has no effect" (botocore's CreateKeyRequest.Policy)
        return False
    if resource is not None and not any(p == "*" or _glob(str(p), resource, case=True)
                                        for p in _listify(statement["Resource"])):
        return False
    if "NotAction" in statement:
        if any(_glob(p, action, case=False) for p in _listify(statement["NotAction"])):
            return False
    elif not any(_glob(p, action, case=False) for p in _listify(statement.get("Action", []))):
        return False
    return _condition_holds(statement.get("Condition", {}), context)


def evaluate(policy: Mapping[str, Any], principal: str, action: str, context: Mapping[str, str] | None = None,
             grants: Sequence[Grant] = (), *, resource: str | None = None) -> Decision:
    """Whether KMS lets `principal` call `action` (`kms:Decrypt`) on this key, with the request's
    condition keys `context` (e.g. `kms:RecipientAttestation:ImageSha384`, present only when the
    request carries a valid attestation document) and the key's `grants`.

    An explicit Deny in the key policy wins over every allow, a grant's included: "No AWS
    principal, including the account root user or key creator, has any permissions to a KMS key
    unless they are explicitly allowed, and never denied, in a key policy, IAM policy, or grant"
    (AWS doc: *Key policies in AWS KMS*, docs.aws.amazon.com/kms/latest/developerguide/
    key-policies.html; likewise *KMS key access and permissions*: "No AWS principal has any
    permissions to a KMS key unless that permission is provided explicitly and never denied").
    Then an Allow statement, or a grant to the caller for the operation; else it is denied.
    `resource`, the key's ARN, is matched against each statement's `Resource` (in a key policy
    `"*"` means this key); None takes every `Resource` to name this key. A statement without
    `Resource` (or `Action`) has no effect, as KMS documents.
    """
    context = context or {}
    statements = policy.get("Statement", [])
    applicable = [s for s in _listify(statements) if _applies(s, principal, action, context, resource)]
    for s in applicable:
        if s.get("Effect") == "Deny":
            return Decision(False, f"denied by {s.get('Sid', 'a statement')}")
    for s in applicable:
        if s.get("Effect") == "Allow":
            return Decision(True, str(s.get("Sid", "a statement")))
    operation = action.split(":", 1)[-1]
    for grant in grants:
        if _caller(grant.grantee) == _caller(principal) and operation in grant.operations:
            return Decision(True, "grant")
    return Decision(False, "no statement or grant allows it")


def plaintext_paths(policy: Mapping[str, Any], principal: str, grants: Sequence[Grant] = ()) -> list[str]:
    """How `principal`, calling without an attestation document, could read data under this key:
    each plaintext operation (PLAINTEXT_OPERATIONS) the policy or a grant lets it call, after it
    made itself the widest grant it may create (`kms:CreateGrant`, from the policy or a grant
    it holds), and `kms:PutKeyPolicy` when it may replace the policy (and so allow itself
    anything). Empty: no way at all."""
    held = list(grants)
    if evaluate(policy, principal, "kms:CreateGrant", {}, held).allowed:
        held.append(Grant(principal, frozenset(GRANT_OPERATIONS)))
    paths = [action for action in PLAINTEXT_OPERATIONS if evaluate(policy, principal, action, {}, held).allowed]
    if evaluate(policy, principal, "kms:PutKeyPolicy", {}, held).allowed:
        paths.append("kms:PutKeyPolicy")
    return paths


# -- what the local KMS checks a key policy against ----------------------------------------------
# `enclaver kms serve` stores a policy only after `validate_policy`, so `evaluate` never meets a
# statement it would misread: a condition this evaluator does not model is refused, never ignored
# (ignoring a condition of an Allow would grant access; of a Deny, lift it).

#: The condition keys the local KMS puts in a request's context (`request_context`), lower-case
#: (IAM's key names are case-insensitive). PCR0..PCR31: every index an NSM document may carry.
SUPPORTED_KEYS = ("kms:RecipientAttestation:ImageSha384", "kms:RecipientAttestation:PCR0…PCR31", "aws:PrincipalArn",
                  "kms:CallerAccount")
_SUPPORTED_KEY = re.compile(r"kms:recipientattestation:(imagesha384|pcr([0-9]|[12][0-9]|3[01]))|aws:principalarn"
                            r"|kms:calleraccount")
_IF_EXISTS_OK = tuple(o for o in _OPERATORS if o != "Null")
_STATEMENT_FIELDS = ("Sid", "Effect", "Principal", "Action", "NotAction", "Resource", "Condition")
_POLICY_FIELDS = ("Version", "Id", "Statement")
_VERSIONS = ("2012-10-17", "2008-10-17")
_PRINCIPAL_ARN = re.compile(r"arn:aws[a-z-]*:(iam|sts)::\d{12}:[\w+=,.@/:-]+|\d{12}")
_ACTION_PATTERN = re.compile(r"\*|[a-z0-9-]+:[A-Za-z0-9*?]+")
_SERVICE = re.compile(r"[a-z0-9.-]+\.amazonaws\.com(\.cn)?")
LOCKOUT_MESSAGE = "The new key policy will not allow you to update the key policy in the future."


class MalformedPolicy(InvalidInput):
    """A key policy the local KMS refuses (KMS's MalformedPolicyDocumentException); the message
    names the statement and the part that is wrong."""


def validate_policy(policy: Any) -> None:
    """Raise MalformedPolicy unless every part of `policy` is something `evaluate` models exactly:
    known fields only; Effect Allow or Deny; a Principal ("*", or AWS ARNs/account IDs, or service
    names); Action/NotAction patterns; Resource strings; conditions with the operators of
    `_OPERATORS` (and their IfExists forms, not NullIfExists) over SUPPORTED_KEYS only. Refused as
    not modelled: NotPrincipal, NotResource, other operators (Numeric…, Date…, ArnLike,
    ForAnyValue:/ForAllValues: …), other condition keys, policy variables (`${…}`)."""
    if not isinstance(policy, dict):
        raise MalformedPolicy("the policy is not a JSON object")
    _fields(policy, _POLICY_FIELDS, "the policy")
    if "Version" in policy and policy["Version"] not in _VERSIONS:
        raise MalformedPolicy(f"Version {policy['Version']!r} is not {' or '.join(_VERSIONS)}")
    statements = policy.get("Statement")
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise MalformedPolicy("the policy has no Statement (a statement object or a non-empty list of them)")
    for index, statement in enumerate(statements):
        _validate_statement(statement, index)


def _where(statement: Any, index: int) -> str:
    sid = statement.get("Sid") if isinstance(statement, dict) else None
    return f"Statement[{index}]" + (f" ({sid})" if isinstance(sid, str) and sid else "")


def _fields(value: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = [k for k in value if k not in allowed]
    if unknown:
        hint = {"NotPrincipal": "NotPrincipal is not modelled: name the principals in Principal",
                "NotResource": "NotResource is not modelled: a key policy's Resource is \"*\" (this key)"}
        text = "; ".join(hint.get(k, "") for k in unknown if k in hint)
        raise MalformedPolicy(f"{where}: unsupported field {', '.join(map(repr, unknown))}"
                              + (f" ({text})" if text else f"; allowed: {', '.join(allowed)}"))


def _strings(value: Any, where: str, what: str) -> list[str]:
    values = _listify(value)
    if not values or not all(isinstance(v, str) and v for v in values):
        raise MalformedPolicy(f"{where}: {what} must be a non-empty string or list of strings")
    if any("${" in v for v in values):
        raise MalformedPolicy(f"{where}: {what} uses a policy variable (${{…}}), which is not modelled")
    return values


def _validate_statement(statement: Any, index: int) -> None:
    where = _where(statement, index)
    if not isinstance(statement, dict):
        raise MalformedPolicy(f"{where}: a statement must be a JSON object")
    _fields(statement, _STATEMENT_FIELDS, where)
    if "Sid" in statement and not isinstance(statement["Sid"], str):
        raise MalformedPolicy(f"{where}: Sid must be a string")
    if statement.get("Effect") not in ("Allow", "Deny"):
        raise MalformedPolicy(f"{where}: Effect must be \"Allow\" or \"Deny\", not {statement.get('Effect')!r}")
    _validate_principal(statement.get("Principal"), where)
    if "Action" in statement and "NotAction" in statement:
        raise MalformedPolicy(f"{where}: Action and NotAction together")
    for name in ("Action", "NotAction"):
        if name in statement:
            for action in _strings(statement[name], where, name):
                if not _ACTION_PATTERN.fullmatch(action):
                    raise MalformedPolicy(f"{where}: {name} {action!r} is not an action (e.g. kms:Decrypt, kms:Get*)")
    if "Resource" in statement:
        _strings(statement["Resource"], where, "Resource")
    if "Condition" in statement:
        _validate_condition(statement["Condition"], where)


def _validate_principal(principal: Any, where: str) -> None:
    if principal == "*":
        return
    if not isinstance(principal, dict) or not principal:
        raise MalformedPolicy(f"{where}: Principal must be \"*\" or an object such as "
                              f"{{\"AWS\": \"arn:aws:iam::111122223333:root\"}} (every statement needs one)")
    _fields(principal, ("AWS", "Service"), f"{where}: Principal")
    for arn in _strings(principal.get("AWS", "*"), where, "Principal.AWS"):
        if arn != "*" and not _PRINCIPAL_ARN.fullmatch(arn):
            raise MalformedPolicy(f"{where}: Principal.AWS {arn!r} is not \"*\", an account ID or an IAM/STS ARN")
    if "Service" in principal:
        for name in _strings(principal["Service"], where, "Principal.Service"):
            if not _SERVICE.fullmatch(name):
                raise MalformedPolicy(f"{where}: Principal.Service {name!r} is not a service name "
                                      f"(e.g. logs.amazonaws.com)")


def _validate_condition(condition: Any, where: str) -> None:
    if not isinstance(condition, dict):
        raise MalformedPolicy(f"{where}: Condition must be an object of operators")
    for operator, keys in condition.items():
        base = operator.removesuffix("IfExists")
        if base not in _OPERATORS or (base != operator and base not in _IF_EXISTS_OK):
            supported = ", ".join(_OPERATORS) + " (and …IfExists, but NullIfExists)"
            raise MalformedPolicy(f"{where}: condition operator {operator!r} is not supported by the local KMS "
                                  f"(supported: {supported}); a condition is never ignored")
        if not isinstance(keys, dict) or not keys:
            raise MalformedPolicy(f"{where}: {operator} must map condition keys to values")
        for key, values in keys.items():
            if not isinstance(key, str) or not _SUPPORTED_KEY.fullmatch(key.lower()):
                raise MalformedPolicy(f"{where}: condition key {key!r} ({operator}) is not supported by the local "
                                      f"KMS (supported: {', '.join(SUPPORTED_KEYS)}); a condition is never ignored")
            listed = _listify(values)
            if not listed or not all(isinstance(v, str | bool | int) and not isinstance(v, float) for v in listed):
                raise MalformedPolicy(f"{where}: {operator} {key}: values must be a string (number, boolean) or a "
                                      f"non-empty list of them")
            if any(isinstance(v, str) and "${" in v for v in listed):
                raise MalformedPolicy(f"{where}: {operator} {key} uses a policy variable (${{…}}), not modelled")
            if base in ("Bool", "Null") and not all(str(v).lower() in ("true", "false") for v in listed):
                raise MalformedPolicy(f"{where}: {operator} {key}: values must be true or false")
            if base == "Null" and len(listed) != 1:
                raise MalformedPolicy(f"{where}: Null {key} takes one value, true or false")


def request_context(principal: str, pcrs: Mapping[int, bytes] | None = None) -> dict[str, str]:
    """A request's condition keys: `aws:PrincipalArn` (an assumed-role session's role, as IAM
    gives it) and `kms:CallerAccount` always; with the PCRs of a *verified* attestation document,
    `kms:RecipientAttestation:ImageSha384` (PCR0) and `kms:RecipientAttestation:PCR<i>` for every
    PCR in it, lower-case hex (AWS doc: *Condition keys for Nitro Enclaves*; which indices KMS
    exposes is UNCONFIRMED, notes §7.3: all of them here)."""
    caller = _caller(principal)
    context = {"aws:PrincipalArn": caller}
    account = _ACCOUNT_OF.fullmatch(caller)
    if account:
        context["kms:CallerAccount"] = account.group(1)
    if pcrs is not None:
        for index, value in sorted(pcrs.items()):
            context[f"{CONDITION}PCR{index}"] = value.hex()
        if 0 in pcrs:
            context[IMAGE_KEY] = pcrs[0].hex()
    return context


def check_lockout(policy: Mapping[str, Any], principal: str, resource: str | None = None) -> None:
    """KMS's lock-out safety check (botocore's CreateKeyRequest.BypassPolicyLockoutSafetyCheck):
    MalformedPolicy with AWS's message unless `policy` lets `principal` call kms:PutKeyPolicy
    later. Its exception name in real KMS is UNCONFIRMED (notes §7.15)."""
    if not evaluate(policy, principal, "kms:PutKeyPolicy", request_context(principal), resource=resource).allowed:
        raise MalformedPolicy(LOCKOUT_MESSAGE)


def default_key_policy(account: str) -> dict[str, Any]:
    """AWS's default key policy (AWS doc: *Default key policy*): the account root may do anything,
    so the account's IAM policies decide."""
    return {"Version": "2012-10-17", "Id": "key-default-1", "Statement": [
        {"Sid": "Enable IAM User Permissions", "Effect": "Allow",
         "Principal": {"AWS": f"arn:aws:iam::{account}:root"}, "Action": "kms:*", "Resource": "*"}]}
