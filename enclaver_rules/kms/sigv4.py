"""Check a request's AWS Signature Version 4 against the local KMS's identities.

botocore computes the signature (`SigV4Auth.canonical_request`, `string_to_sign`, `signature`, the
same code that signs every SDK request, fed the request's own `X-Amz-Date`); this module only parses
the `Authorization` header, rebuilds the request from exactly the headers it names, and compares with
`hmac.compare_digest`. No HMAC chain is written here.

Identities are long-term keys (`--identity AKID:SECRET=ARN`). A request carrying
`X-Amz-Security-Token` is accepted for a known access key whatever the token: the local IMDS hands out
the configured key with a session token, and this KMS trusts the key, not the token (real STS
credentials are bound to their token). The clock-skew bound is 15 minutes, AWS's for SigV4 ("Elements
of an AWS API request signature"; for KMS specifically UNCONFIRMED, notes §7.12). Error names:
UnrecognizedClientException (unknown key) and InvalidSignatureException (a signature, scope or time
that does not match) as the issue names them; MissingAuthenticationTokenException and
IncompleteSignatureException for a missing or malformed header (AWS's names for other JSON services;
UNCONFIRMED for KMS).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from enclaver_rules.kms.wire import ServiceError

SKEW = timedelta(minutes=15)
SERVICE = "kms"
TIMESTAMP = "%Y%m%dT%H%M%SZ"
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=([^,\s]+)\s*,\s*SignedHeaders=([^,\s]+)\s*,\s*Signature=([0-9a-f]{64})\s*")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
BAD_SIGNATURE = ("The request signature we calculated does not match the signature you provided. Check your AWS "
                 "Secret Access Key and signing method. Consult the service documentation for details.")


@dataclass(frozen=True, slots=True)
class Identity:
    """A configured caller: its access key id, its secret (never shown) and the principal it acts as."""

    access_key: str
    secret_key: str = field(repr=False)
    principal: str


def _error(code: str, message: str) -> ServiceError:
    return ServiceError(code, message)  # HTTP 400, as moto answers these (real KMS's status: UNCONFIRMED)


def verify(*, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes,
           identities: Mapping[str, Identity], region: str, now: datetime) -> Identity:
    """The identity that signed this request; ServiceError otherwise. `headers` as received (name,
    value) pairs, duplicates kept; `path` the request target (KMS uses `/`)."""
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)
    authorization = values.get("authorization", [])
    if not authorization:
        raise _error("MissingAuthenticationTokenException", "Missing Authentication Token")
    match = _AUTHORIZATION.fullmatch(authorization[0].strip()) if len(authorization) == 1 else None
    if match is None:
        raise _error("IncompleteSignatureException",
                     "Authorization must be one header: AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/"
                     "aws4_request, SignedHeaders=…, Signature=<64 hex digits>")
    credential, signed, signature = match.groups()
    scope = credential.split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise _error("IncompleteSignatureException",
                     f"Credential {credential!r} must be AKID/DATE/REGION/SERVICE/aws4_request")
    access_key, day, scope_region, scope_service, _ = scope
    identity = identities.get(access_key)
    if identity is None:
        raise _error("UnrecognizedClientException", "The security token included in the request is invalid.")
    if scope_service != SERVICE:
        raise _error("InvalidSignatureException", f"Credential should be scoped to correct service: '{SERVICE}'.")
    if scope_region != region:
        raise _error("InvalidSignatureException",
                     f"Credential should be scoped to a valid region, not '{scope_region}'. This local KMS serves "
                     f"'{region}'.")
    names = signed.split(";")
    if names != sorted(set(names)) or not all(_HEADER_NAME.fullmatch(n) for n in names):
        raise _error("IncompleteSignatureException", f"SignedHeaders {signed!r} is not a sorted list of header names")
    for required in ("host", "x-amz-date"):
        if required not in names:
            raise _error("InvalidSignatureException", f"the {required} header must be signed")
    missing = [n for n in names if n not in values]
    if missing:
        raise _error("InvalidSignatureException", f"signed header(s) {', '.join(missing)} missing from the request")
    if any(len(values.get(n, ())) > 1 for n in ("host", "x-amz-date", "x-amz-security-token")):
        raise _error("IncompleteSignatureException", "Host, X-Amz-Date and X-Amz-Security-Token may each appear once")
    stamp = values["x-amz-date"][0].strip()
    try:
        signed_at = datetime.strptime(stamp, TIMESTAMP).replace(tzinfo=UTC)
    except ValueError:
        raise _error("IncompleteSignatureException", f"X-Amz-Date {stamp!r:.40} is not YYYYMMDDTHHMMSSZ") from None
    if day != stamp[:8]:
        raise _error("InvalidSignatureException",
                     f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
                     f"'{day}' != '{stamp[:8]}'")
    if signed_at < now - SKEW:
        raise _error("InvalidSignatureException", f"Signature expired: {stamp} is now earlier than "
                                                  f"{(now - SKEW).strftime(TIMESTAMP)} ({now.strftime(TIMESTAMP)} - 15 min.)")
    if signed_at > now + SKEW:
        raise _error("InvalidSignatureException", f"Signature not yet current: {stamp} is still later than "
                                                  f"{(now + SKEW).strftime(TIMESTAMP)} ({now.strftime(TIMESTAMP)} + 15 min.)")
    content_sha256 = values.get("x-amz-content-sha256")
    if content_sha256 and content_sha256[-1].strip() != hashlib.sha256(body).hexdigest():
        raise _error("InvalidSignatureException", "x-amz-content-sha256 is not the SHA-256 of the body")
    if not hmac.compare_digest(expected_signature(identity, method, path, headers, names, body, stamp, region),
                               signature):
        raise _error("InvalidSignatureException", BAD_SIGNATURE)
    return identity


def expected_signature(identity: Identity, method: str, path: str, headers: Sequence[tuple[str, str]],
                       signed: Sequence[str], body: bytes, stamp: str, region: str) -> str:
    """botocore's signature over the request as received: only the signed headers, its own X-Amz-Date."""
    request = AWSRequest(method=method, url="http://localhost" + path, data=body)
    for name, value in headers:
        if name.lower() in signed:
            request.headers[name] = value  # email.message semantics: appends, so duplicates are kept
    request.context["timestamp"] = stamp  # what add_auth would set from the clock
    auth = SigV4Auth(ReadOnlyCredentials(identity.access_key, identity.secret_key, None), SERVICE, region)
    canonical = auth.canonical_request(request)
    return str(auth.signature(auth.string_to_sign(request, canonical), request))
