"""Credentials from IMDSv2 for odyn's KMS proxy: fetched, kept and refreshed as botocore does.

Stdlib only (`http.client`, `json`): this module is staged into odyn's static binary. It talks to the
instance metadata service directly, or through an HTTP forward proxy (odyn's egress proxy), sending
plain-HTTP requests in absolute form (`GET http://169.254.169.254/latest/… HTTP/1.1`) so the egress
policy decides whether IMDS may be reached.

The protocol (`boto/botocore botocore/utils.py`, `IMDSFetcher` and `InstanceMetadataFetcher`; AWS: *How
Instance Metadata Service Version 2 works*):

* `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` (1..21600; botocore asks for 21600)
  gives a session token, sent as `X-aws-ec2-metadata-token` on every `GET`. It is reused until shortly
  before its TTL runs out, and fetched again when IMDS answers 401. IMDSv2 only: botocore falls back to
  IMDSv1 when the token `PUT` gets 403, 404 or 405; this client reports it instead, since every Nitro
  instance offers IMDSv2 and a refused token means something to fix, not a reason to downgrade.
* `GET /latest/meta-data/iam/security-credentials/` names the role (404: no role attached);
  `GET …/security-credentials/ROLE` gives `Code`, `AccessKeyId`, `SecretAccessKey`, `Token`, `Expiration`,
  or `Code` and `Message` on an error.
* `GET /latest/dynamic/instance-identity/document` gives the `region`.

Refresh (`boto/botocore botocore/credentials.py`, `RefreshableCredentials._refresh` and
`_protected_refresh`, `_DEFAULT_ADVISORY_REFRESH_TIMEOUT = 15 * 60`, `_DEFAULT_MANDATORY_REFRESH_TIMEOUT =
10 * 60`):

* more than `advisory` (15 min) left: the current set, no request;
* less than `advisory` left: the one caller that gets the lock without waiting refreshes, the others go on
  with the current set; when that refresh fails the current set is kept and a warning logged;
* less than `mandatory` (10 min) left (or no set yet): every caller waits for a refresh, and a failed one
  raises `ImdsError`;
* `force_refresh()` (after KMS answers `ExpiredTokenException`) fetches now, unless a fetch begun after the
  call already succeeded.

Static stability (`boto/botocore botocore/utils.py`, `InstanceMetadataFetcher._evaluate_expiration`, from
botocore PR 2664): when IMDS hands out credentials that expire within 10 minutes plus a jitter of 2 to 10
minutes, they are treated as expiring that long from now instead (and logged), so an IMDS outage does
not stop a client whose service still accepts the set; the service has the last word. `Credentials.expiration`
stays what IMDS said; only the refresh decisions use the extended time.

Every answer is bounded: 64 KiB of body, `timeout` seconds per request in all (connect, send, headers and
body together, however slowly a peer drips). Anything wrong in an answer is an `ImdsError` with a message
that says what, never another exception. Secrets (the secret key, the session token, the IMDS token) are
kept out of `repr`, log lines and error text, and handed to `enclaver_rules.redact` so nothing printed
later can show them either.
"""

from __future__ import annotations

import http
import http.client
import json
import logging
import random
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from enclaver_rules import redact

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger("enclaver.credentials")

DEFAULT_BASE_URL = "http://169.254.169.254"
MAX_ANSWER = 64 * 1024
TOKEN_PATH = "/latest/api/token"
ROLE_PATH = "/latest/meta-data/iam/security-credentials/"
IDENTITY_PATH = "/latest/dynamic/instance-identity/document"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL = 21600
#: botocore's `RefreshableCredentials` windows.
ADVISORY = timedelta(minutes=15)
MANDATORY = timedelta(minutes=10)
#: botocore's `ec2_credential_refresh_window` default, and its jitter of `random.randint(120, 600)` seconds.
STATIC_STABILITY = timedelta(minutes=10)
#: An IMDS token is fetched again when less than this is left of its TTL (at most half the TTL).
TOKEN_MARGIN = timedelta(seconds=60)

_ROLE = re.compile(r"[\w+=,.@-]{1,64}", re.ASCII)  # IAM's role-name characters
_ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9]{1,128}")
_HEADER_SAFE = re.compile(r"[\x21-\x7e]{1,8192}")  # what may go into a header: visible ASCII, no blanks
_REGION = re.compile(r"[a-z0-9-]{1,64}")
_FIELDS = ("AccessKeyId", "SecretAccessKey", "Token", "Expiration")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _botocore_jitter() -> timedelta:
    return timedelta(seconds=random.randint(120, 600))  # spreads the retries of many clients; not a secret


class ImdsError(OSError):
    """IMDS could not be reached, refused, or answered something unusable. The message says which, and
    never holds a secret."""


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    token: str | None = field(repr=False)
    expiration: datetime | None


class ImdsCredentials:
    """The instance role's credentials from IMDSv2, refreshed before they expire. Thread-safe."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, proxy: tuple[str, int] | None = None,
                 timeout: float = 2.0, clock: Callable[[], datetime] = utcnow, advisory: timedelta = ADVISORY,
                 mandatory: timedelta = MANDATORY, token_ttl: int = MAX_TOKEN_TTL,
                 jitter: Callable[[], timedelta] = _botocore_jitter) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme != "http" or not url.hostname or url.query or url.fragment:
            raise ValueError(f"IMDS base URL must be http://HOST[:PORT], not {base_url!r}")
        if not 1 <= token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl must be 1..{MAX_TOKEN_TTL} seconds, not {token_ttl}")
        if timeout <= 0 or mandatory > advisory:
            raise ValueError("timeout must be positive and the mandatory window no longer than the advisory one")
        self._host, self._port = url.hostname, url.port or 80
        self._origin = f"http://{url.netloc}"  # the absolute-form prefix sent to a proxy
        self._prefix = url.path.rstrip("/")
        self._proxy = proxy
        self._timeout = timeout
        self._clock = clock
        self._advisory, self._mandatory = advisory, mandatory
        self._token_ttl = token_ttl
        self._jitter = jitter
        self._lock = threading.Lock()  # held by whoever fetches credentials
        self._token_lock = threading.Lock()
        self._token: tuple[str, datetime] | None = None
        #: the current set and the time the refresh decisions count down to; replaced whole, never mutated
        self._state: tuple[Credentials, datetime] | None = None
        self._fetches = 0  # fetches begun (under `_lock`)
        self._fetched_by: int | None = None  # the number of the fetch that produced `_state`
        self._region: str | None = None

    # -- the public face ----------------------------------------------------------------------------

    def get(self) -> Credentials:
        """The current credentials, refreshed first when they are inside a refresh window."""
        if self._needs(self._advisory):
            if self._lock.acquire(blocking=False):
                try:
                    if self._needs(self._advisory):
                        self._refresh(mandatory=self._needs(self._mandatory))
                finally:
                    self._lock.release()
            elif self._needs(self._mandatory):
                with self._lock:
                    if self._needs(self._mandatory):
                        self._refresh(mandatory=True)
        state = self._state
        if state is None:  # only if a refresh raised, which it did above
            raise ImdsError("no credentials from IMDS yet")
        return state[0]

    def force_refresh(self) -> Credentials:
        """Fetch a new set now (the service said the current one expired). A failure raises `ImdsError`
        and keeps the current set. Callers that arrive together cause one fetch, not one each."""
        begun = self._fetches
        with self._lock:
            state = self._state
            if state is not None and self._fetched_by is not None and self._fetched_by > begun:
                return state[0]  # a fetch begun after this call already brought a new set
            self._refresh(mandatory=True)
            state = self._state
            assert state is not None
            return state[0]

    def region(self) -> str:
        """The instance's region, from its identity document; asked once."""
        if self._region is None:
            doc = _json_object(self._get(IDENTITY_PATH), "the instance identity document")
            region = doc.get("region")
            if not isinstance(region, str) or not _REGION.fullmatch(region):
                raise ImdsError("the instance identity document has no usable \"region\"")
            self._region = region
        return self._region

    # -- refresh --------------------------------------------------------------------------------------

    def _needs(self, window: timedelta) -> bool:
        state = self._state
        return state is None or state[1] - self._clock() < window

    def _refresh(self, *, mandatory: bool) -> None:
        """Fetch a new set; the caller holds `_lock`."""
        self._fetches += 1
        number = self._fetches
        try:
            credentials = self._fetch()
        except ImdsError as e:
            state = self._state
            if mandatory or state is None:
                raise
            left = state[1] - self._clock()
            log.warning("refreshing the IMDS credentials failed (advisory: %d s left of the current set): %s; "
                        "keeping the current set", left.total_seconds(), e)
            return
        self._state = (credentials, self._count_down_to(credentials))
        self._fetched_by = number

    def _count_down_to(self, credentials: Credentials) -> datetime:
        """The time refresh decisions count down to: the expiration, or (static stability) later."""
        assert credentials.expiration is not None
        now = self._clock()
        offset = STATIC_STABILITY + self._jitter()
        if now >= credentials.expiration - offset:
            log.info("IMDS handed out credentials (%s) that expire at %s, within %d min: using them until %s "
                     "and asking again then (botocore's static stability)", credentials.access_key_id,
                     _iso(credentials.expiration), offset.total_seconds() // 60, _iso(now + offset))
            return now + offset
        return credentials.expiration

    def _fetch(self) -> Credentials:
        listing = self._get(ROLE_PATH, missing="no IAM role attached to this instance")
        lines = [line.strip() for line in listing.decode("ascii", "replace").splitlines() if line.strip()]
        if not lines or not _ROLE.fullmatch(lines[0]):
            raise ImdsError(f"no IAM role attached to this instance (IMDS listed no usable role name at {ROLE_PATH})")
        role = lines[0]
        credentials = parse_credentials(self._get(ROLE_PATH + role), role)
        redact.remember(credentials.secret_access_key, credentials.token)
        log.debug("IMDS credentials for role %s: %s, expiring at %s", role, credentials.access_key_id,
                  _iso(credentials.expiration) if credentials.expiration else "never")
        return credentials

    # -- HTTP -----------------------------------------------------------------------------------------

    def _get(self, path: str, *, missing: str = "") -> bytes:
        """GET with a token; a 401 fetches a new token once."""
        for attempt in (1, 2):
            token = self._session_token(renew=attempt == 2)
            status, body = self._request("GET", path, {TOKEN_HEADER: token})
            if status == 200:
                return body
            if status == 401 and attempt == 1:
                log.debug("IMDS answered 401 for GET %s: fetching a new token", path)
                continue
            if status == 404 and missing:
                raise ImdsError(f"{missing} (IMDS answered 404 for GET {path})")
            raise ImdsError(f"{self._who()} answered {_status(status)} for GET {path}")
        raise AssertionError("unreachable")

    def _session_token(self, *, renew: bool) -> str:
        with self._token_lock:
            now = self._clock()
            if self._token is not None and not renew and self._token[1] > now:
                return self._token[0]
            status, body = self._request("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(self._token_ttl)})
            if status in (403, 404, 405):
                raise ImdsError(f"{self._who()} answered {_status(status)} for PUT {TOKEN_PATH}: no IMDSv2 token "
                                "(IMDS disabled, or the request crossed more hops than the instance's "
                                "HttpPutResponseHopLimit allows)")
            if status != 200:
                raise ImdsError(f"{self._who()} answered {_status(status)} for PUT {TOKEN_PATH}")
            token = body.decode("ascii", "replace").strip()
            if not _HEADER_SAFE.fullmatch(token):
                raise ImdsError(f"IMDS answered PUT {TOKEN_PATH} with something that is not a token")
            redact.remember(token)
            ttl = timedelta(seconds=self._token_ttl)
            self._token = (token, now + ttl - min(TOKEN_MARGIN, ttl / 2))
            return token

    def _who(self) -> str:
        where = f"IMDS at {self._host}:{self._port}"
        return f"{where} (through the proxy at {self._proxy[0]}:{self._proxy[1]})" if self._proxy else where

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        deadline = time.monotonic() + self._timeout
        if self._proxy:
            connection = _Connection(self._proxy[0], self._proxy[1], deadline)
            target = self._origin + self._prefix + path
        else:
            connection = _Connection(self._host, self._port, deadline)
            target = self._prefix + path
        try:
            connection.request(method, target, headers=headers)
            answer = connection.getresponse()
            body = answer.read(MAX_ANSWER + 1)
            if len(body) > MAX_ANSWER:
                raise ImdsError(f"{self._who()} answered {method} {path} with more than {MAX_ANSWER // 1024} KiB")
            if answer.length:  # `read(amt)` returns short when the peer closes early; `read()` would raise
                raise ImdsError(f"{self._who()} ended its answer to {method} {path} {answer.length} bytes short of "
                                "its Content-Length")
            return answer.status, body
        except ImdsError:
            raise
        except TimeoutError:
            raise ImdsError(f"{self._who()} did not answer {method} {path} within {self._timeout:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise ImdsError(f"cannot {method} {path} from {self._who()}: {_reason(e)}") from None
        finally:
            connection.close()


def parse_credentials(body: bytes, role: str) -> Credentials:
    """The credentials document IMDS serves for `role`, checked field by field."""
    what = f"the credentials document of role {role}"
    doc = _json_object(body, what)
    code = doc.get("Code", "Success")
    if code != "Success":
        message = doc.get("Message")
        detail = f": {_clip(message)}" if isinstance(message, str) and message else ""
        raise ImdsError(f"IMDS refused the credentials of role {role}: {_clip(str(code))}{detail}")
    bad = [name for name in _FIELDS if not isinstance(doc.get(name), str) or not doc[name]]
    if bad:
        raise ImdsError(f"{what} lacks {', '.join(bad)} (or {'it is' if len(bad) == 1 else 'they are'} not text)")
    if not _ACCESS_KEY_ID.fullmatch(doc["AccessKeyId"]):
        raise ImdsError(f"{what} has an AccessKeyId that is not 1 to 128 letters and digits")
    if not _HEADER_SAFE.fullmatch(doc["Token"]):
        raise ImdsError(f"{what} has a Token that is not up to 8 KiB of visible ASCII")
    try:
        expiration = datetime.fromisoformat(doc["Expiration"])
    except ValueError:
        raise ImdsError(f"{what} has an Expiration that is not an ISO 8601 time") from None
    if expiration.tzinfo is None:
        expiration = expiration.replace(tzinfo=UTC)
    return Credentials(doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"], expiration.astimezone(UTC))


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ImdsError(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise ImdsError(f"{what} is not a JSON object")
    return doc


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int) -> str:
    """`404 Not Found`: the phrase is ours, never the peer's text."""
    try:
        return f"{code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def _clip(text: str, limit: int = 200) -> str:
    """Peer-supplied text fit for a message: printable, short, and with anything secret-looking masked."""
    printable = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return redact.text(printable + ("…" if len(text) > limit else ""))


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return _clip(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)


class _DeadlineSocket(socket.socket):
    """A socket whose every send and receive waits only until one absolute deadline."""

    deadline = 0.0

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.settimeout(left)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return super().recv_into(buffer, nbytes, flags)

    def sendall(self, data: ReadableBuffer, flags: int = 0) -> None:
        self._arm()
        super().sendall(data, flags)


class _Connection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, deadline: float) -> None:
        super().__init__(host, port)
        self._deadline = deadline

    def connect(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        plain = socket.create_connection((self.host, self.port), left)
        sock = _DeadlineSocket(plain.family, plain.type, plain.proto, plain.detach())
        sock.deadline = self._deadline
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
