"""Secrets are never printed: the one place that decides what a credential looks like in text.

Everything enclaver shows a person passes through `text()` (or `value()` for a JSON document) on
its way out: every `Diagnostic`, every log line, every CLI line and JSON document, `--debug`
tracebacks, doit task failures. Two nets, because neither is enough alone:

* **What a secret looks like.** PEM private keys (replaced by their fingerprint); the value of an
  `Authorization`-like header in any spelling a server or a repr echoes it (`Authorization: Basic …`,
  `{'Authorization': 'Bearer …'}`, `"Authorization":["…"]`); `password=`/`token: `/`"secret": "…"`;
  a bare `Basic`/`Bearer` credential; JWTs; the user-info of a URL or an image reference
  (`user:PASS@host/repo`, `https://TOKEN@host`), told apart from a digest (`app@sha256:…`).
* **What this process knows is secret.** The registry client `remember()`s each credential it sends
  (the Basic pair, its password, each Bearer token), so an echo in any shape we cannot recognise
  (a registry that puts the bare token in a header we quote) is still removed — also its base64,
  URL-encoded and JSON-escaped spellings.

Redaction replaces a secret by ``***`` (keeping a header's scheme and a reference's host, so the
message still says what failed), or a private key by ``<EC PRIVATE KEY sha256:0123456789abcdef>``,
the first 16 hex digits of the SHA-256 of its DER bytes: enough to tell keys apart, nothing to
recover one from. Pure and stdlib-only: imported by the pure packages (`errors`, `manifest`, `oci`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

MASK = "***"
#: Shorter remembered secrets are not scrubbed by value (a 3-letter password would blank out every
#: word containing it); the shape rules above still apply to them.
MIN_REMEMBERED = 6

#: Copy-on-write, so a reader (any thread printing) never sees the set change under it.
_known: frozenset[str] = frozenset()
_known_lock = threading.Lock()

# -- shapes ---------------------------------------------------------------------------------------

_PEM = re.compile(r"-----BEGIN (?P<label>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----(?P<body>.*?)"
                  r"(?:-----END (?P=label)-----|\Z)", re.S)
#: Header names whose value is a credential, in the shapes servers and reprs echo them:
#: `Name: v`, `'Name': 'v'`, `"Name":["v"]`, `name=v`.
_HEADER = re.compile(
    r"(?i)(?P<name>\b(?:proxy-)?authorization|\bx-registry-auth|\bx-amz-security-token|\bx-auth-token|\bx-api-key"
    r"|\bset-cookie|\bcookie)(?P<sep>[\"']?\s*[:=]\s*\[?\s*[\"']?)(?P<value>[^\r\n\"'\]}&]*)")
_SCHEME = re.compile(r"(?i)^(?P<scheme>basic|bearer|digest|token|negotiate|aws4-hmac-sha256)(?P<space>\s+)")
#: `password=…`, `"token": "…"`, `MY_SECRET=…`, `client_secret: …`: a name holding one of these words,
#: standing alone (`/srv/secrets: no such file` is a path, not a secret's name).
_KEY_VALUE = re.compile(
    r"(?i)(?P<name>(?<![A-Za-z0-9_./\\-])[A-Za-z0-9_.-]*?(?:password|passwd|passphrase|secret|token|api[_-]?key"
    r"|private[_-]?key|credential)[A-Za-z0-9_-]*|\"auth\"|'auth')"
    r"(?P<sep>[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"',;&}\]]+)")
_BARE = re.compile(r"(?<![A-Za-z0-9])(?P<scheme>Basic|Bearer)(?P<space>\s+)"
                   r"(?P<value>[A-Za-z0-9._~+/-]+=*)(?![A-Za-z0-9._~+/=-])")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
#: A transport or URL scheme in front of an image reference.
_TRANSPORT = re.compile(r"^(?:(?P<url>[A-Za-z][A-Za-z0-9+.-]*://)|(?:docker-daemon|docker-archive|oci-archive|oci|docker):)")
#: What follows the `@` of a digest-pinned reference (`sha256:…`), as opposed to a host after user-info
#: (no `^`: it is matched from a position, with `match(text, pos)`).
_DIGEST_AT = re.compile(r"(?:sha\d+(?:[+._-][a-z0-9]+)*:|[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Fa-f0-9]{32,})")
#: A run of text without blanks or quotes: user-info is looked for in each run that holds an `@`
#: (matched run by run, so a long run costs one pass, never one pass per position).
_RUN = re.compile(r"[^\s\"'`]+")
_SECRET_KEY_NAME = re.compile(
    r"(?i)(password|passwd|passphrase|secret|token|api[_-]?key|private[_-]?key|credential|^auth$"
    r"|authorization|^cookie$|^set-cookie$|x-registry-auth|x-amz-security-token)")


def remember(*secrets: str | None) -> None:
    """Scrub these exact strings (and their base64, URL and JSON spellings) from all later output."""
    global _known
    forms: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= MIN_REMEMBERED:
            forms |= {secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote(secret, safe=""),
                      urllib.parse.quote_plus(secret), json.dumps(secret)[1:-1], repr(secret)[1:-1]}
    forms = {f for f in forms if len(f) >= MIN_REMEMBERED} - _known
    if forms:
        with _known_lock:
            _known = _known | forms


def remember_basic(encoded: str | None) -> None:
    """A Basic credential (base64 `user:secret`): the pair, the secret alone, and the base64."""
    if not encoded:
        return
    remember(encoded)
    try:
        pair = base64.b64decode(encoded, validate=False).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return
    remember(pair, pair.partition(":")[2])


def remember_authorization(header: str | None) -> None:
    """The credential in an `Authorization` header value (`Basic …`, `Bearer …`)."""
    if not header:
        return
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() == "basic":
        remember_basic(credential.strip())
    else:
        remember(credential.strip() or header)


def forget_all() -> None:
    """For tests: drop the remembered secrets."""
    global _known
    with _known_lock:
        _known = frozenset()


def fingerprint(material: str | bytes) -> str:
    """`sha256:` and 16 hex digits. For PEM, of the DER bytes (the same however the PEM is wrapped,
    indented or escaped), else of the bytes given."""
    import hashlib  # here: every `enclaver` start imports this module, few fingerprint

    data = material.encode() if isinstance(material, str) else material
    m = _PEM.search(data.decode("utf-8", "replace"))
    if m:
        lines = re.split(r"\\[nr]|[\r\n]", m.group("body"))
        # leave out the Proc-Type/DEK-Info headers of old encrypted PEM
        body = re.sub(r"\s", "", "".join(line for line in lines if ":" not in line))
        with contextlib.suppress(binascii.Error, ValueError):
            data = base64.b64decode(body + "=" * (-len(body) % 4), validate=False) or data
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def is_key_material(value: str) -> bool:
    """Text that is a key, not a path to one: PEM armour, several lines, or far too long for a path."""
    return "-----BEGIN" in value or "-----END" in value or "\n" in value or len(value) > 1024


def describe_key(value: str) -> str:
    """What `config show` prints for inline key material: its kind and fingerprint, never the key."""
    m = _PEM.search(value)
    kind = f"PEM {m.group('label')}" if m else "key material"
    return f"<inline {kind}, {fingerprint(value)}, redacted>"


def _pem(m: re.Match[str]) -> str:
    return f"<{m.group('label')} {fingerprint(m.group(0))}>"


def _header(m: re.Match[str]) -> str:
    value = m.group("value")
    if not value.strip():
        return m.group(0)
    scheme = _SCHEME.match(value)
    kept = scheme.group(0) if scheme else ""
    return f"{m.group('name')}{m.group('sep')}{kept}{MASK}"


def _key_value(m: re.Match[str]) -> str:
    if m.group("value") == MASK or m.group("value").startswith("<"):
        return m.group(0)
    return f"{m.group('name')}{m.group('sep')}{MASK}"


def _bare(m: re.Match[str]) -> str:
    value = m.group("value")
    if len(value) < 8 or (value.isalpha() and len(value) < 16):  # `Basic authentication`, not a credential
        return m.group(0)
    if value.endswith("=") and m.string[m.end():m.end() + 1] == '"':  # a challenge: `Bearer realm="…"`
        return m.group(0)
    return f"{m.group('scheme')}{m.group('space')}{MASK}"


def _userinfo(token: str, *, strict: bool) -> str:
    """`[transport]userinfo@host…` → `[transport]***@host…`. The user-info ends at the last `@`
    that does not start a digest. Outside a known reference (`strict` False) only user-info with a
    password (`user:pass@`) or after a URL scheme counts: `git@github.com` is not a secret."""
    m = _TRANSPORT.match(token)
    prefix, rest = (m.group(0), token[m.end():]) if m else ("", token)
    at = -1
    for i, c in enumerate(rest):
        if c == "@" and not _DIGEST_AT.match(rest, i + 1):
            at = i
    if at <= 0:
        return token
    userinfo = rest[:at]
    if userinfo == MASK:
        return token
    if strict or (m and m.group("url")) or ":" in userinfo:
        # a token from free text may begin with punctuation that is not part of the reference
        lead = "" if strict or prefix else re.match(r"^[(\[{<=,;]*", userinfo).group(0)  # type: ignore[union-attr]
        return f"{prefix}{lead}{MASK}{rest[at:]}"
    return token


def text(message: str) -> str:
    """`message` with every secret this module recognises or remembers replaced."""
    if not message:
        return message
    out = message
    for secret in sorted(_known, key=len, reverse=True):  # longest first: a pair before its password
        if secret in out:
            out = out.replace(secret, MASK)
    if "PRIVATE KEY" in out:
        out = _PEM.sub(_pem, out)
    out = _HEADER.sub(_header, out)
    out = _KEY_VALUE.sub(_key_value, out)
    out = _BARE.sub(_bare, out)
    out = _JWT.sub(MASK, out)
    if "@" in out:
        out = _RUN.sub(lambda t: _userinfo(t.group(0), strict=False) if "@" in t.group(0) else t.group(0), out)
    return out


def reference(ref: str) -> str:
    """An image reference (or transport argument) as given by a user, safe to quote: any user-info
    is masked (`user:PASS@host/app` → `***@host/app`), whatever characters the password holds."""
    return text(_userinfo(ref, strict=True)) if "@" in ref else text(ref)


def value(document: Any) -> Any:
    """A JSON-like document with every string passed through `text()`, and the whole value of a
    key that names a secret (`password`, `Authorization`, …) masked."""
    if isinstance(document, str):
        return text(document)
    if isinstance(document, Mapping):
        return {k: (_masked(v) if isinstance(k, str) and _SECRET_KEY_NAME.search(k) else value(v))
                for k, v in document.items()}
    if isinstance(document, list | tuple):
        return [value(v) for v in document]
    return document


def _masked(v: Any) -> Any:
    if isinstance(v, str) and v:
        scheme = _SCHEME.match(v)
        return (scheme.group(0) if scheme else "") + MASK if not v.startswith("<") else v
    if isinstance(v, Mapping | list | tuple):
        return value(v)
    return v
