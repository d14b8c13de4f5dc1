"""The local KMS's actions: keys, key policies enforced, and `Recipient` answered as KMS does.

Why not moto: it enforces no key policy and no condition, ignores `Recipient`, keeps nothing across
restarts and has no GenerateDataKeyPair or DeriveSharedSecret (kms-recipient notes §5.1) — the very
things this server exists to test. What is reused instead: botocore's model for every member and
limit (`shapes`), botocore's signer (`sigv4`), the one policy evaluator (`enclaver_rules.policy.kms`),
the one attestation verifier (`enclaver_rules.attestation.verify`) and the one CMS builder (`cms`).

Authorization is the key policy alone (IAM is not modelled: the account root in a policy admits every
principal of that account) plus the key's grants; CreateKey, ListKeys and GenerateRandom use no key
policy (AWS checks them with IAM only), so any configured identity may call them.

With a `Recipient` the document is verified first (signature, chain to a trusted root, every
certificate valid now), its PCRs become the request's `kms:RecipientAttestation:*` condition keys,
the policy decides, and the answer carries `CiphertextForRecipient` (`cms.build_enveloped` for the
document's RSA key) with the plaintext member left out (the model says "null or empty"; absent
here). A document that fails verification is a ValidationException (the code real KMS uses is
UNCONFIRMED, notes §7.4) and never yields plaintext.

`CiphertextBlob` is this KMS's own format (`ciphertext`). A blob that does not parse, names a key not
held here, fails its tag or is opened with another encryption context: InvalidCiphertextException; a
blob of another key than the KeyId given: IncorrectKeyException.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclaver_rules.kms import ciphertext, recipient, shapes
from enclaver_rules.kms.keystore import GrantRecord, Key, KeyStore
from enclaver_rules.kms.recipient import Attested
from enclaver_rules.kms.wire import ServiceError, loads
from enclaver_rules.policy import kms as policy

SYMMETRIC = "SYMMETRIC_DEFAULT"
ECC_CURVES: Mapping[str, Callable[[], ec.EllipticCurve]] = {
    "ECC_NIST_P256": ec.SECP256R1, "ECC_NIST_P384": ec.SECP384R1, "ECC_NIST_P521": ec.SECP521R1}
DATA_KEY_PAIRS: Mapping[str, Callable[[], Any]] = {
    "RSA_2048": lambda: rsa.generate_private_key(65537, 2048),
    "RSA_3072": lambda: rsa.generate_private_key(65537, 3072),
    "RSA_4096": lambda: rsa.generate_private_key(65537, 4096),
    "ECC_NIST_P256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ECC_NIST_P384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ECC_NIST_P521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ECC_SECG_P256K1": lambda: ec.generate_private_key(ec.SECP256K1()),
}
DATA_KEY_SIZES = {"AES_256": 32, "AES_128": 16}


@dataclass(frozen=True, slots=True)
class Caller:
    principal: str  # the ARN the caller acts as
    access_key: str = ""


class LocalKms:
    """Every action on one key store. Thread-safe (the store is; keys change only through it)."""

    def __init__(self, store: KeyStore, *, region: str, account: str, roots: Sequence[x509.Certificate],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.region = region
        self.account = account
        self.roots = tuple(roots)
        self.clock = clock

    def call(self, action: str, body: Any, caller: Caller) -> dict[str, Any]:
        """One request's decoded JSON body → the answer's JSON members; ServiceError otherwise."""
        handler = getattr(self, f"_{action}", None) if action in _ACTIONS else None
        if handler is None:
            raise ServiceError("UnknownOperationException",
                               f"{action} is not an operation this local KMS implements "
                               f"(it implements {', '.join(sorted(_ACTIONS))})")
        params = shapes.parse_input(action, body)
        result: dict[str, Any] = handler(params, caller)
        return shapes.serialize_output(action, result)

    # --- keys and authorization ------------------------------------------------------------------

    def _key(self, key_id: str) -> Key:
        """KeyId as a key id or key ARN (aliases are not modelled)."""
        if key_id.startswith("alias/") or (key_id.startswith("arn:") and ":alias/" in key_id):
            raise ServiceError("NotFoundException", f"Alias '{key_id}' is not found (this local KMS models no "
                                                    f"aliases: use the key id or key ARN)")
        if key_id.startswith("arn:"):
            found = next((k for k in self.store.all() if k.arn == key_id), None)
        else:
            found = self.store.get(key_id)
        if found is None:
            raise ServiceError("NotFoundException", f"Key '{self._arn(key_id)}' does not exist")
        return found

    def _arn(self, key_id: str) -> str:
        return key_id if key_id.startswith("arn:") else f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def _authorize(self, key: Key, iam_action: str, caller: Caller, attested: Attested | None = None) -> None:
        context = policy.request_context(caller.principal, attested.pcrs if attested else None)
        grants = [policy.Grant(g.grantee, frozenset(g.operations)) for g in key.grants]
        decision = policy.evaluate(loads(key.policy), caller.principal, iam_action, context, grants,
                                   resource=key.arn)
        if not decision.allowed:
            why = ("with an explicit deny in a resource-based policy" if decision.explicit_deny else
                   f"because no resource-based policy allows the {iam_action} action")
            raise ServiceError("AccessDeniedException", f"User: {caller.principal} is not authorized to perform: "
                                                        f"{iam_action} on resource: {key.arn} {why}")

    def _use(self, params: dict[str, Any], action: str, caller: Caller, attested: Attested | None = None,
             *, usage: str = "ENCRYPT_DECRYPT", member: str = "KeyId") -> Key:
        key = self._key(params[member])
        self._authorize(key, f"kms:{action}", caller, attested)
        if key.key_usage != usage:
            raise ServiceError("InvalidKeyUsageException", f"{key.arn} is a {key.key_spec} key for {key.key_usage}, "
                                                           f"not {usage}")
        self._dry_run(params)
        return key

    @staticmethod
    def _dry_run(params: Mapping[str, Any]) -> None:
        if params.get("DryRun"):
            raise ServiceError("DryRunOperationException",
                               "The request would have succeeded, but the DryRun option is set.")

    # --- Recipient -------------------------------------------------------------------------------

    def _attested(self, params: Mapping[str, Any]) -> Attested | None:
        return recipient.attested(params.get("Recipient"), self.roots, datetime.fromtimestamp(self.clock(), UTC))

    _answer = staticmethod(recipient.answer)

    # --- the ciphertext blob ---------------------------------------------------------------------

    @staticmethod
    def _seal(key: Key, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        return ciphertext.seal(key.key_id, key.material, plaintext, context)

    def _unseal(self, blob: bytes, context: Mapping[str, str] | None, key_id: str | None, caller: Caller,
                iam_action: str, attested: Attested | None = None) -> tuple[Key, bytes]:
        try:
            parsed = ciphertext.parse(blob)
        except ciphertext.InvalidCiphertext as e:
            raise ServiceError("InvalidCiphertextException", str(e)) from None
        owner = self.store.get(parsed.key_id)
        if owner is None:
            raise ServiceError("InvalidCiphertextException", "the ciphertext names a key this local KMS does not hold")
        if key_id is not None and self._key(key_id).key_id != owner.key_id:
            raise ServiceError("IncorrectKeyException", f"The key ID in the request does not identify the key that "
                                                        f"encrypted the ciphertext ({owner.arn})")
        self._authorize(owner, iam_action, caller, attested)  # before the tag is checked: no oracle for strangers
        try:
            return owner, ciphertext.unseal(parsed, owner.material, context)
        except ciphertext.InvalidCiphertext as e:
            raise ServiceError("InvalidCiphertextException", str(e)) from None

    # --- management ------------------------------------------------------------------------------

    def _CreateKey(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        spec = p.get("KeySpec") or p.get("CustomerMasterKeySpec") or SYMMETRIC
        usage = p.get("KeyUsage") or ("ENCRYPT_DECRYPT" if spec == SYMMETRIC else None)
        for member, allowed in (("Origin", "AWS_KMS"), ("MultiRegion", False)):
            if member in p and p[member] != allowed:
                raise ServiceError("UnsupportedOperationException", f"{member} {p[member]!r}: this local KMS makes "
                                                                    f"single-Region AWS_KMS keys only")
        for member in ("CustomKeyStoreId", "XksKeyId"):
            if member in p:
                raise ServiceError("UnsupportedOperationException", f"{member}: custom key stores are not modelled")
        if spec == SYMMETRIC and usage == "ENCRYPT_DECRYPT":
            material = os.urandom(32)
        elif spec in ECC_CURVES and usage == "KEY_AGREEMENT":
            material = ec.generate_private_key(ECC_CURVES[spec]()).private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        else:
            raise ServiceError("UnsupportedOperationException",
                               f"KeySpec {spec} with KeyUsage {usage}: this local KMS makes SYMMETRIC_DEFAULT keys "
                               f"(ENCRYPT_DECRYPT) and {', '.join(ECC_CURVES)} keys (KEY_AGREEMENT)")
        key_id = str(uuid.uuid4())
        arn = self._arn(key_id)
        text = p.get("Policy") or json.dumps(policy.default_key_policy(self.account), indent=2)
        if "Policy" in p:
            self._check_policy(text, caller, arn, p.get("BypassPolicyLockoutSafetyCheck", False))
        key = Key(key_id, arn, self.account, self.region, self.clock(), spec, usage, text, material,
                  p.get("Description", ""))
        self.store.put(key)
        return {"KeyMetadata": self._metadata(key)}

    @staticmethod
    def _check_policy(text: str, caller: Caller, arn: str, bypass: bool) -> None:
        try:
            document = loads(text)
        except ValueError as e:
            raise ServiceError("MalformedPolicyDocumentException", f"the policy is not JSON: {e}") from None
        try:
            policy.validate_policy(document)
            if not bypass:
                policy.check_lockout(document, caller.principal, arn)
        except policy.MalformedPolicy as e:
            raise ServiceError("MalformedPolicyDocumentException", e.diagnostics[0].message) from None

    def _metadata(self, key: Key) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "AWSAccountId": key.account, "KeyId": key.key_id, "Arn": key.arn, "CreationDate": key.created,
            "Enabled": True, "Description": key.description, "KeyUsage": key.key_usage, "KeyState": "Enabled",
            "Origin": "AWS_KMS", "KeyManager": "CUSTOMER", "CustomerMasterKeySpec": key.key_spec,
            "KeySpec": key.key_spec, "MultiRegion": False}
        if key.key_usage == "ENCRYPT_DECRYPT":
            meta["EncryptionAlgorithms"] = [SYMMETRIC]
        else:
            meta["KeyAgreementAlgorithms"] = ["ECDH"]
        return meta

    def _DescribeKey(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._key(p["KeyId"])
        self._authorize(key, "kms:DescribeKey", caller)
        return {"KeyMetadata": self._metadata(key)}

    def _ListKeys(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        keys = self.store.all()
        start = 0
        if "Marker" in p:
            ids = [k.key_id for k in keys]
            if p["Marker"] not in ids:
                raise ServiceError("InvalidMarkerException", "the Marker is not one this local KMS returned")
            start = ids.index(p["Marker"])
        limit = p.get("Limit", 100)
        page = keys[start:start + limit]
        out: dict[str, Any] = {"Keys": [{"KeyId": k.key_id, "KeyArn": k.arn} for k in page],
                               "Truncated": start + limit < len(keys)}
        if out["Truncated"]:
            out["NextMarker"] = keys[start + limit].key_id
        return out

    def _PutKeyPolicy(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._key(p["KeyId"])
        self._authorize(key, "kms:PutKeyPolicy", caller)
        _policy_name(p)
        self._check_policy(p["Policy"], caller, key.arn, p.get("BypassPolicyLockoutSafetyCheck", False))
        self.store.update(key.key_id, lambda k: replace(k, policy=p["Policy"]))
        return {}

    def _GetKeyPolicy(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._key(p["KeyId"])
        self._authorize(key, "kms:GetKeyPolicy", caller)
        _policy_name(p)
        return {"Policy": key.policy, "PolicyName": "default"}

    def _CreateGrant(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._key(p["KeyId"])
        self._authorize(key, "kms:CreateGrant", caller)
        if "Constraints" in p or "GranteeServicePrincipal" in p or "GranteePrincipal" not in p:
            raise ServiceError("UnsupportedOperationException", "this local KMS models grants to a GranteePrincipal "
                                                                "without Constraints only")
        self._dry_run(p)
        grant_id = os.urandom(32).hex()
        record = _grant(grant_id, p, caller, self.clock())
        self.store.update(key.key_id, lambda k: replace(k, grants=k.grants + (record,)))
        return {"GrantToken": os.urandom(32).hex(), "GrantId": grant_id}

    def _ListGrants(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._key(p["KeyId"])
        self._authorize(key, "kms:ListGrants", caller)
        grants = [g for g in key.grants if p.get("GrantId") in (None, g.grant_id)]
        return {"Grants": [{"KeyId": key.arn, "GrantId": g.grant_id, "Name": g.name or None, "CreationDate": g.created,
                            "GranteePrincipal": g.grantee, "RetiringPrincipal": g.retiring or None,
                            "IssuingAccount": f"arn:aws:iam::{key.account}:root", "Operations": list(g.operations)}
                           for g in grants], "Truncated": False}

    def _RevokeGrant(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._key(p["KeyId"])
        self._authorize(key, "kms:RevokeGrant", caller)
        if not any(g.grant_id == p["GrantId"] for g in key.grants):
            raise ServiceError("NotFoundException", f"Grant ID {p['GrantId']} not found")
        self._dry_run(p)
        self.store.update(key.key_id, lambda k: replace(k, grants=tuple(g for g in k.grants
                                                                        if g.grant_id != p["GrantId"])))
        return {}

    # --- cryptography ----------------------------------------------------------------------------

    def _Encrypt(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._use(p, "Encrypt", caller)
        _symmetric_only(p.get("EncryptionAlgorithm"))
        return {"CiphertextBlob": self._seal(key, p["Plaintext"], p.get("EncryptionContext")), "KeyId": key.arn,
                "EncryptionAlgorithm": SYMMETRIC}

    def _Decrypt(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        _symmetric_only(p.get("EncryptionAlgorithm"))
        if "CiphertextBlob" not in p:
            raise ServiceError("ValidationException", "1 validation error detected: Value null at 'ciphertextBlob' "
                                                      "failed to satisfy constraint: Member must not be null")
        attested = self._attested(p)
        key, plaintext = self._unseal(p["CiphertextBlob"], p.get("EncryptionContext"), p.get("KeyId"), caller,
                                      "kms:Decrypt", attested)
        self._dry_run(p)
        return self._answer("Decrypt", {"KeyId": key.arn, "EncryptionAlgorithm": SYMMETRIC}, plaintext, attested)

    def _ReEncrypt(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        for member in ("SourceEncryptionAlgorithm", "DestinationEncryptionAlgorithm"):
            _symmetric_only(p.get(member))
        if "CiphertextBlob" not in p:
            raise ServiceError("ValidationException", "1 validation error detected: Value null at 'ciphertextBlob' "
                                                      "failed to satisfy constraint: Member must not be null")
        source, plaintext = self._unseal(p["CiphertextBlob"], p.get("SourceEncryptionContext"), p.get("SourceKeyId"),
                                         caller, "kms:ReEncryptFrom")
        destination = self._use({"KeyId": p["DestinationKeyId"], "DryRun": p.get("DryRun")}, "ReEncryptTo", caller)
        return {"CiphertextBlob": self._seal(destination, plaintext, p.get("DestinationEncryptionContext")),
                "SourceKeyId": source.arn, "KeyId": destination.arn, "SourceEncryptionAlgorithm": SYMMETRIC,
                "DestinationEncryptionAlgorithm": SYMMETRIC}

    def _data_key(self, p: dict[str, Any]) -> bytes:
        if ("KeySpec" in p) == ("NumberOfBytes" in p):
            raise ServiceError("ValidationException", "Please specify either number of bytes or key spec.")
        return os.urandom(DATA_KEY_SIZES[p["KeySpec"]] if "KeySpec" in p else p["NumberOfBytes"])

    def _GenerateDataKey(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        data_key = self._data_key(p)
        attested = self._attested(p)
        key = self._use(p, "GenerateDataKey", caller, attested)
        result = {"CiphertextBlob": self._seal(key, data_key, p.get("EncryptionContext")), "KeyId": key.arn}
        return self._answer("GenerateDataKey", result, data_key, attested)

    def _GenerateDataKeyWithoutPlaintext(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        data_key = self._data_key(p)
        key = self._use(p, "GenerateDataKeyWithoutPlaintext", caller)
        return {"CiphertextBlob": self._seal(key, data_key, p.get("EncryptionContext")), "KeyId": key.arn}

    def _key_pair(self, p: dict[str, Any], action: str, caller: Caller,
                  attested: Attested | None = None) -> tuple[Key, bytes, dict[str, Any]]:
        spec = p["KeyPairSpec"]
        if spec not in DATA_KEY_PAIRS:
            raise ServiceError("UnsupportedOperationException", f"KeyPairSpec {spec}: this local KMS makes "
                                                                f"{', '.join(DATA_KEY_PAIRS)}")
        key = self._use(p, action, caller, attested)
        private = DATA_KEY_PAIRS[spec]()
        der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        public = private.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        return key, der, {"PrivateKeyCiphertextBlob": self._seal(key, der, p.get("EncryptionContext")),
                          "PublicKey": public, "KeyId": key.arn, "KeyPairSpec": spec}

    def _GenerateDataKeyPair(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        attested = self._attested(p)
        _, der, result = self._key_pair(p, "GenerateDataKeyPair", caller, attested)
        return self._answer("GenerateDataKeyPair", result, der, attested)

    def _GenerateDataKeyPairWithoutPlaintext(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        return self._key_pair(p, "GenerateDataKeyPairWithoutPlaintext", caller)[2]

    def _GenerateRandom(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        if "CustomKeyStoreId" in p:
            raise ServiceError("UnsupportedOperationException", "CustomKeyStoreId: custom key stores are not modelled")
        if "NumberOfBytes" not in p:
            raise ServiceError("ValidationException", "1 validation error detected: Value null at 'numberOfBytes' "
                                                      "failed to satisfy constraint: Member must not be null")
        attested = self._attested(p)
        return self._answer("GenerateRandom", {}, os.urandom(p["NumberOfBytes"]), attested)

    def _GetPublicKey(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._key(p["KeyId"])
        self._authorize(key, "kms:GetPublicKey", caller)
        if key.key_usage != "KEY_AGREEMENT":
            raise ServiceError("UnsupportedOperationException", f"{key.arn} is a symmetric key: it has no public key")
        private = serialization.load_der_private_key(key.material, password=None)
        public = private.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        return {"KeyId": key.arn, "PublicKey": public, "CustomerMasterKeySpec": key.key_spec, "KeySpec": key.key_spec,
                "KeyUsage": key.key_usage, "KeyAgreementAlgorithms": ["ECDH"]}

    def _DeriveSharedSecret(self, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
        attested = self._attested(p)
        key = self._use(p, "DeriveSharedSecret", caller, attested, usage="KEY_AGREEMENT")
        private = serialization.load_der_private_key(key.material, password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        try:
            peer = serialization.load_der_public_key(p["PublicKey"])
        except ValueError:
            peer = None
        if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != private.curve.name:
            raise ServiceError("ValidationException", f"PublicKey must be a DER SubjectPublicKeyInfo on the key's "
                                                      f"curve ({key.key_spec})")
        secret = private.exchange(ec.ECDH(), peer)
        result = {"KeyId": key.arn, "KeyAgreementAlgorithm": "ECDH", "KeyOrigin": "AWS_KMS"}
        return self._answer("DeriveSharedSecret", result, secret, attested)


_ACTIONS = frozenset(name[1:] for name in vars(LocalKms) if name[1:2].isupper() and name.startswith("_"))


def _grant(grant_id: str, p: Mapping[str, Any], caller: Caller, now: float) -> GrantRecord:
    return GrantRecord(grant_id, p["GranteePrincipal"], tuple(p["Operations"]), p.get("Name", ""),
                       p.get("RetiringPrincipal", ""), now, caller.principal)


def _policy_name(p: Mapping[str, Any]) -> None:
    if p.get("PolicyName", "default") != "default":
        raise ServiceError("NotFoundException", f"Policy {p['PolicyName']!r} does not exist: a key has one policy, "
                                                f"named default")


def _symmetric_only(algorithm: str | None) -> None:
    if algorithm not in (None, SYMMETRIC):
        raise ServiceError("InvalidKeyUsageException", f"EncryptionAlgorithm {algorithm}: this local KMS's "
                                                       f"encryption keys are {SYMMETRIC} keys")
