"""The KMS proxy's rewriting, sans-IO: what the app asked, what KMS gets, what the app gets back.

The app's request (`app_call`): `POST /` in AWS JSON 1.1 with `X-Amz-Target: TrentService.<Action>`,
signed by the app's SDK with whatever credentials it has. The signature is **not** verified: the
app inside the enclave is the proxy's only possible client (it listens on 127.0.0.1), so checking
the app's own signature would prove nothing, and the proxy signs again with the instance's
credentials anyway. Only the credential scope is read, for the region (which picks the endpoint and
the signing region) and the service, which must be `kms`. For the five actions that take a
`Recipient` the body must be one JSON object (a key given twice is refused, so the proxy and KMS
cannot read two different requests from it); `with_recipient` sets `Recipient` to the fresh
attestation document, replacing any the app sent. Other actions are passed on byte for byte.

KMS's answer (`open_answer`): a 200 to a Recipient action loses `CiphertextForRecipient`, which is
opened with the proxy's key, and the plaintext goes, base64, into the field the action normally
answers in (`wire.RECIPIENT_ACTIONS`: Plaintext, PrivateKeyPlaintext or SharedSecret; upstream
always wrote Plaintext). Any other answer passes through as it is.

Errors are `ProxyError(status, message)`, which reaches the app in KMS's error shape
(`{"__type": "KMSProxyError", "message": "odyn's KMS proxy: …"}`), so an SDK raises it as a
client error with that code.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from enclaver_rules.kms import wire
from odyn.http_head import Request, absolute_target
from odyn.local_http import HttpError

ERROR_CODE = "KMSProxyError"
SERVICE = "kms"
#: KMS's answers to a signature it does not accept: the instance's credentials expired or rotated
#: (UNCONFIRMED which one KMS uses for expired session tokens; kms-recipient notes §4.3), worth one
#: refresh from IMDS and one retry.
CREDENTIAL_ERRORS = frozenset({"ExpiredTokenException", "UnrecognizedClientException", "InvalidSignatureException"})
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]+")  # the manifest schema's pattern for `endpoints` keys
_SCOPE = re.compile(r"([^/\s]+)/([0-9]{8})/([^/\s]+)/([^/\s]+)/aws4_request")


class ProxyError(HttpError):
    """What the app gets instead of KMS's answer: `status` and one line, in KMS's error shape."""

    def body(self) -> bytes:
        return wire.error_body(ERROR_CODE, f"odyn's KMS proxy: {self.message}")


@dataclass(frozen=True, slots=True)
class AppCall:
    """One KMS call the app made, ready to be signed again and sent."""

    action: str  # Decrypt
    region: str  # from the app's credential scope
    body: bytes  # what KMS gets: the app's bytes, or for a Recipient action, the object re-serialised
    document: dict[str, object] | None  # the body's object, for a Recipient action (to add Recipient to)
    user_agent: str | None = None

    @property
    def target(self) -> str:
        return wire.target_of(self.action)

    @property
    def attested(self) -> bool:
        return self.action in wire.RECIPIENT_ACTIONS


def route(request: Request) -> None:
    """KMS's JSON protocol is `POST /` only: 404 for another path, 405 for another method."""
    target = request.target
    if target[:8].lower().startswith(("http://", "https://")):  # absolute-form, which servers must accept
        target = absolute_target(target).path
    if target.partition("?")[0] != "/":
        raise ProxyError(404, f"not found: KMS's JSON protocol is POST / (got {target[:80]!r})")
    if request.method != "POST":
        raise ProxyError(405, f"{request.method} is not allowed: KMS's JSON protocol is POST /")


def credential_scope(request: Request) -> tuple[str, str]:
    """(region, service) of the SigV4 credential scope: from `Authorization: AWS4-HMAC-SHA256
    Credential=AKID/DATE/REGION/SERVICE/aws4_request, …`, or a presigned `X-Amz-Credential`."""
    scope = None
    authorization = request.header("authorization")
    if authorization is not None:
        algorithm, _, fields = authorization.strip().partition(" ")
        if algorithm != "AWS4-HMAC-SHA256":
            raise ProxyError(400, f"the request is not signed with SigV4 (Authorization: {algorithm[:40]!r}): the "
                                  "proxy reads the region from the SigV4 credential scope")
        for part in fields.split(","):
            name, _, value = part.strip().partition("=")
            if name == "Credential":
                scope = value
    else:
        query = request.target.partition("?")[2]
        scope = next((v for k, v in parse_qsl(query) if k.lower() == "x-amz-credential"), None)
    if scope is None:
        raise ProxyError(400, "the request is not signed: sign it with SigV4 (any credentials do: the proxy signs "
                              "again with the instance's); it reads the region from the credential scope")
    match = _SCOPE.fullmatch(scope)
    if match is None:
        raise ProxyError(400, f"the SigV4 credential scope {scope[:120]!r} is not AKID/DATE/REGION/SERVICE/aws4_request")
    region, service = match.group(3), match.group(4)
    if service != SERVICE:
        raise ProxyError(400, f"the request is signed for the service {service[:40]!r}; this proxy serves only kms")
    if not _REGION.fullmatch(region):
        raise ProxyError(400, f"the credential scope's region {region[:40]!r} is not an AWS region name")
    return region, service


def app_call(request: Request, body: bytes) -> AppCall:
    """The app's call, or ProxyError (400) for a request no KMS would take."""
    target = request.header(wire.TARGET_HEADER)
    if target is None:
        raise ProxyError(400, f"the request has no {wire.TARGET_HEADER} header (TrentService.<Action>)")
    try:
        action = wire.action_of(target)
    except ValueError as e:
        raise ProxyError(400, str(e)) from None
    region, _ = credential_scope(request)
    document = None
    if action in wire.RECIPIENT_ACTIONS:
        document = _object(body, f"the {action} request")
        body = _dumps(document)
    return AppCall(action, region, body, document, request.header("user-agent"))


def with_recipient(call: AppCall, attestation_document: bytes) -> bytes:
    """The body KMS gets for a Recipient action: the app's object with `Recipient` set to the
    proxy's (replacing any the app sent)."""
    assert call.document is not None
    document = dict(call.document)
    document[wire.RECIPIENT] = {"KeyEncryptionAlgorithm": wire.KEY_ENCRYPTION_ALGORITHM,
                                "AttestationDocument": base64.b64encode(attestation_document).decode("ascii")}
    return _dumps(document)


def open_answer(call: AppCall, status: int, body: bytes, unseal: Callable[[bytes], bytes]) -> bytes:
    """The body the app gets. For a 200 to a Recipient action: `CiphertextForRecipient` removed,
    opened by `unseal` (which raises ValueError — `cms.CmsError` — when it cannot), and its
    plaintext put, base64, into the action's field. Anything else: `body` as it is."""
    if status != 200 or not call.attested:
        return body
    answer = _object(body, f"KMS's 200 answer to {call.action}", status=502)
    sealed = answer.pop(wire.CIPHERTEXT_FOR_RECIPIENT, None)
    if sealed is None:
        raise ProxyError(502, f"KMS answered {call.action} without {wire.CIPHERTEXT_FOR_RECIPIENT}, so the plaintext "
                              "never reached the enclave (does this endpoint ignore Recipient? it is not AWS KMS, or "
                              "not one that supports Nitro Enclaves)")
    if not isinstance(sealed, str):
        raise ProxyError(502, f"KMS answered {call.action} with a {wire.CIPHERTEXT_FOR_RECIPIENT} that is not a "
                              "base64 string")
    try:
        blob = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError):
        raise ProxyError(502, f"KMS answered {call.action} with a {wire.CIPHERTEXT_FOR_RECIPIENT} that is not "
                              "base64") from None
    try:
        plaintext = unseal(blob)
    except ValueError as e:
        raise ProxyError(502, f"the {wire.CIPHERTEXT_FOR_RECIPIENT} KMS answered {call.action} with does not open "
                              f"with the proxy's key: {e!s:.300}") from None
    answer[wire.RECIPIENT_ACTIONS[call.action]] = base64.b64encode(plaintext).decode("ascii")
    return _dumps(answer)


def error_code(body: bytes) -> str | None:
    """The code of a KMS error body (`__type`, after any `#` and before any `:`, as botocore reads it)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    code = document.get("__type") if isinstance(document, dict) else None
    if not isinstance(code, str):
        return None
    return code.rpartition("#")[2].partition(":")[0]


# -- JSON ------------------------------------------------------------------------------------------


def _object(body: bytes, what: str, status: int = 400) -> dict[str, object]:
    try:
        document = wire.loads(body.decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a key given twice
        raise ProxyError(status, f"{what} is not usable JSON: {e!s:.200}") from None
    if not isinstance(document, dict):
        raise ProxyError(status, f"{what} is not a JSON object")
    return document


def _dumps(document: dict[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("ascii")
