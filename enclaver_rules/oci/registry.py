"""Registry client: the Distribution API over requests, with oras-py for token auth.

What oras-py brings: the Bearer token dance (challenge → token endpoint, with or without
credentials) and credential helpers (`docker-credential-*`). What we add around it, because a
build that pins code by digest must not trust the wire:

* every manifest and blob is digest-verified as it streams; manifest bytes are kept as served;
* blobs stream to the store in bounded chunks, never whole in memory;
* HEAD before upload, cross-repository mount when the blob is in a sibling repository;
* timeouts and a bounded retry budget on idempotent requests (a dead registry fails in seconds);
* plain HTTP only for localhost / 127.0.0.0/8 / ::1 or hosts named with --insecure-registry;
* credentials from `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`): inline
  `auths`, `credHelpers`, `credsStore`. Never printed: each credential and token is handed to
  `redact.remember` when it is first used, and every error built from what a registry sent (its
  body, its headers, a transport error) is redacted before it is cut short and raised, so a
  registry that echoes our `Authorization` header cannot make us print it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from enclaver_rules import redact
from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.reference import DOCKER_HUB, DOCKER_HUB_API
from enclaver_rules.oci.store import CHUNK, Progress, Store

log = logging.getLogger("enclaver.registry")
# oras-py logs auth failures at ERROR on its own; our error already says what failed and how to fix it
logging.getLogger("oras.logger").setLevel(logging.CRITICAL)

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
RETRIES = 3
MAX_MANIFEST_BYTES = 4 << 20


class NotFound(OperationFailed):
    """The registry answered: no such manifest or blob."""


class RegistryUnavailable(OperationFailed):
    """The registry could not be reached or did not answer in time."""


#: What a response body's transfer raises when it fails midway (not a content problem), for modules
#: that stream a body without importing the HTTP client themselves (tests/test_imports.py).
TRANSFER_ERRORS: tuple[type[BaseException], ...] = (requests.exceptions.RequestException,
                                                    urllib3.exceptions.HTTPError, OSError)
Response = requests.Response  # the type of what `Registry.request` answers, for the same modules


def is_local(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- credentials ---------------------------------------------------------------------------------


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def _config_keys(registry: str) -> list[str]:
    """The keys `docker login` may have stored `registry`'s credentials under. Docker Hub's are
    under its v1 index URL whether the client was made for `docker.io` or for its API host."""
    if registry in (DOCKER_HUB, DOCKER_HUB_API):
        return ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
    return [registry, f"https://{registry}", f"http://{registry}"]


def basic_credentials(registry: str, config_path: Path | None = None) -> str | None:
    """base64 `user:secret` for `registry` from the Docker config, or None (anonymous)."""
    path = config_path or docker_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise OperationFailed(f"{path}: cannot read the Docker config: {e}", fix="fix or remove the file") from None
    keys = _config_keys(registry)
    auths = config.get("auths") or {}
    for key in keys:
        entry = auths.get(key) or {}
        if entry.get("auth"):
            return str(entry["auth"])
        if entry.get("username") and entry.get("password"):
            return base64.b64encode(f"{entry['username']}:{entry['password']}".encode()).decode()
    helper = next((config["credHelpers"][k] for k in keys if k in (config.get("credHelpers") or {})), None)
    helper = helper or config.get("credsStore")
    if helper:
        from oras.auth.base import AuthBackend

        # oras runs `docker-credential-<helper> get` and returns base64 user:secret
        found: str | None = AuthBackend()._get_auth_from_creds_store(helper, keys[0] if registry in (DOCKER_HUB, DOCKER_HUB_API) else registry)
        return found
    return None


# -- HTTP ---------------------------------------------------------------------------------------


class _Session(requests.Session):
    """A session whose every request has a timeout (requests' default is to wait forever)."""

    timeout: tuple[float, float] | None = None  # None: the module's CONNECT_TIMEOUT and READ_TIMEOUT, read per request

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout or (CONNECT_TIMEOUT, READ_TIMEOUT))
        return super().request(method, url, *args, **kwargs)  # type: ignore[arg-type]


def _session(retries: int, timeout: tuple[float, float] | None = None) -> requests.Session:
    session = _Session()
    session.timeout = timeout
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=0.3,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=frozenset({"GET", "HEAD"}),
                  respect_retry_after_header=False, raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "enclaver"
    return session


@dataclass(frozen=True, slots=True)
class PushResult:
    digest: Digest
    how: str  # exists | mounted | uploaded


class _Body:
    """A request body: an iterable of 1 MiB chunks with a length, so requests sends Content-Length
    (not chunked encoding) and http.client writes whole chunks (a file-like body goes out in 8 KiB
    writes)."""

    def __init__(self, stream: BinaryIO, size: int, progress: Progress | None) -> None:
        self.stream = stream
        self.size = size
        self.progress = progress

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        self.stream.seek(0)  # replayable: a request retried after an auth challenge sends it whole again
        for chunk in iter(lambda: self.stream.read(CHUNK), b""):
            if self.progress:
                self.progress(len(chunk))
            yield chunk


def _shorten(text: str, limit: int = 200) -> str:
    """One line (a diagnostic stays greppable), at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


class Registry:
    """One registry host. Methods take the repository, so a client serves many repositories."""

    def __init__(self, host: str, *, insecure: bool = False, retries: int = RETRIES,
                 credentials: Callable[[str], str | None] = basic_credentials,
                 timeout: tuple[float, float] | None = None) -> None:
        """`timeout` is (connect, read) seconds for every request; a quick question such as an
        up-to-date check gives a short one (with `retries=0`) so a dead registry costs seconds."""
        self.host = host
        self.scheme = "http" if insecure or is_local(host) else "https"
        self.session = _session(retries, timeout)
        self._credentials = credentials
        self._basic_looked_up = False
        self._basic: str | None = None
        self._basic_wanted = False
        self._tokens: dict[str, Any] = {}  # repository → oras TokenAuth (tokens are scoped per repository)

    # -- plumbing --------------------------------------------------------------------------------

    def url(self, repository: str, tail: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{repository}/{tail}"

    def _basic_auth(self) -> str | None:
        if not self._basic_looked_up:
            self._basic = self._credentials(self.host)
            self._basic_looked_up = True
            redact.remember_basic(self._basic)
        return self._basic

    def _authenticate(self, repository: str, response: requests.Response, headers: dict[str, str],
                      refresh: bool) -> bool:
        challenge = response.headers.get("WWW-Authenticate", "")
        if challenge.lower().startswith("basic"):
            basic = self._basic_auth()
            if not basic or headers.get("Authorization") == f"Basic {basic}":
                return False
            headers["Authorization"] = f"Basic {basic}"
            self._basic_wanted = True  # from now on, send it up front (a streamed upload cannot be replayed cheaply)
            return True
        if not challenge.lower().startswith("bearer"):
            return False
        backend = self._tokens.get(repository)
        if backend is None:
            import oras.auth

            backend = oras.auth.get_auth_backend("token", self.session, self.scheme == "http", tls_verify=True)
            basic = self._basic_auth()
            if basic:
                backend._basic_auth = basic
            self._tokens[repository] = backend
        new_headers, changed = backend.authenticate_request(response, dict(headers), refresh=refresh)
        headers.update(new_headers)
        redact.remember_authorization(headers.get("Authorization"))  # a new Bearer token
        return bool(changed)

    def request(self, method: str, url: str, repository: str, *, headers: dict[str, str] | None = None,
                stream: bool = False, data: Any = None, ok: tuple[int, ...] = (200,),
                what: str = "") -> requests.Response:
        headers = dict(headers or {})
        target = urlsplit(url)
        # our credentials go only to this registry: an upload Location or a next-page Link may name
        # another host (a CDN, or a hostile registry collecting tokens), which gets the request bare
        ours = (target.scheme, target.netloc) == (self.scheme, self.host)
        backend = self._tokens.get(repository)
        if not ours:
            headers.pop("Authorization", None)
        elif backend is not None and getattr(backend, "token", None):
            headers["Authorization"] = f"Bearer {backend.token}"
        elif self._basic_wanted and self._basic:
            headers["Authorization"] = f"Basic {self._basic}"
        for attempt in range(3):
            try:
                response = self.session.request(method, url, headers=headers, stream=stream, data=data,
                                                allow_redirects=True)
            except requests.exceptions.RequestException as e:
                raise RegistryUnavailable(
                    f"{self.host}: {what or method + ' ' + url} failed: {type(e).__name__}: {redact.text(str(e))}",
                    fix="check the registry address and that it is up; a local HTTP registry must be on "
                        "localhost/127.0.0.1 or named with --insecure-registry") from None
            if response.status_code not in (401, 403) or attempt == 2 or not ours:
                break
            if not self._authenticate(repository, response, headers, refresh=attempt > 0):
                break
        if response.status_code in ok:
            return response
        self._fail(response, what or f"{method} {url}")
        raise AssertionError("unreachable")

    def _fail(self, response: requests.Response, what: str) -> None:
        """Raise the error for a refused request. What the registry said is quoted (shortened), and
        redacted first, whole: a body may echo our Authorization header, and cutting it before
        redacting could leave a credential that no longer looks like one."""
        detail = ""
        try:
            errors = response.json().get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, AttributeError):
            detail = response.text[:1 << 16]
        detail = _shorten(redact.text(detail).strip())
        message = f"{self.host}: {what}: HTTP {response.status_code}" + (f" ({detail})" if detail else "")
        if response.status_code == 404:
            raise NotFound(message, fix="check the repository, tag and digest")
        if response.status_code in (401, 403):
            raise OperationFailed(message, fix=f"log in first (`docker login {self.host}`), or check your access")
        raise OperationFailed(message, fix="the registry refused the request; try again or check its logs")

    # -- manifests -------------------------------------------------------------------------------

    def get_manifest(self, repository: str, selector: str) -> tuple[bytes, str]:
        """Manifest or index bytes exactly as served, and their media type; verified when pinned."""
        what = f"manifest {repository}:{selector}" if ":" not in selector else f"manifest {repository}@{selector}"
        response = self.request("GET", self.url(repository, f"manifests/{selector}"), repository,
                                headers={"Accept": mt.ACCEPT}, stream=True, what=what)
        declared = response.headers.get("Content-Length")
        if declared and int(declared) > MAX_MANIFEST_BYTES:
            raise OperationFailed(f"{self.host}: {what} is {declared} bytes", fix="this is not an image manifest")
        raw = response.raw.read(MAX_MANIFEST_BYTES + 1, decode_content=True)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise OperationFailed(f"{self.host}: {what} is larger than {MAX_MANIFEST_BYTES} bytes",
                                  fix="this is not an image manifest")
        got = Digest.of(raw)
        if selector.startswith("sha256:") and got != Digest.parse(selector):
            raise DigestMismatch(f"{self.host}: {what}: served content is {got}",
                                 fix="the registry serves tampered or corrupt data; do not use it")
        served = response.headers.get("Docker-Content-Digest")
        if served and served.startswith("sha256:") and served != str(got):
            raise DigestMismatch(f"{self.host}: {what}: Docker-Content-Digest says {served}, content is {got}",
                                 fix="the registry serves tampered or corrupt data; do not use it")
        media_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        return raw, media_type

    def head_manifest(self, repository: str, selector: str) -> Digest | None:
        """The digest of the manifest that `selector` (a tag or a digest) names, from one HEAD (no
        body), or None when the registry has no such manifest. For a question that must stay cheap,
        such as whether a push is still in place; a GET verifies content, this only asks."""
        pinned = Digest.parse(selector) if ":" in selector else None
        what = f"manifest {repository}@{selector}" if pinned else f"manifest {repository}:{selector}"
        try:
            response = self.request("HEAD", self.url(repository, f"manifests/{selector}"), repository,
                                    headers={"Accept": mt.ACCEPT}, what=what)
        except NotFound:
            return None
        served = response.headers.get("Docker-Content-Digest", "")
        if served:
            try:
                digest = Digest.parse(served)
            except ValueError:
                raise OperationFailed(f"{self.host}: {what}: Docker-Content-Digest {served!r} is not a digest",
                                      fix="the registry answers out of spec; do not trust this registry") from None
            if pinned and digest != pinned:
                raise DigestMismatch(f"{self.host}: {what}: Docker-Content-Digest says {served}",
                                     fix="the registry serves tampered or corrupt data; do not use it")
            return digest
        if pinned:
            return pinned
        raise OperationFailed(f"{self.host}: {what}: the answer names no digest (no Docker-Content-Digest)",
                              fix="fetch the manifest to learn its digest")

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        digest = Digest.of(raw)
        response = self.request("PUT", self.url(repository, f"manifests/{reference}"), repository,
                                headers={"Content-Type": media_type}, data=raw, ok=(200, 201, 202),
                                what=f"push manifest {repository}:{reference}")
        served = response.headers.get("Docker-Content-Digest")
        if served and served != str(digest):
            raise DigestMismatch(f"{self.host}: stored manifest as {served}, we sent {digest}",
                                 fix="the registry rewrote the manifest; do not trust this registry")
        return digest

    # -- blobs -----------------------------------------------------------------------------------

    def has_blob(self, repository: str, digest: Digest) -> bool:
        try:
            self.request("HEAD", self.url(repository, f"blobs/{digest}"), repository, what=f"blob {digest.short}")
        except NotFound:
            return False
        return True

    def fetch_blob(self, repository: str, descriptor: Descriptor, store: Store,
                   progress: Progress | None = None) -> Digest:
        """Stream a blob into the store, verifying digest and size; nothing is kept on mismatch."""
        if store.has(descriptor.digest):
            if progress:
                progress(descriptor.size)
            return descriptor.digest
        response = self.request("GET", self.url(repository, f"blobs/{descriptor.digest}"), repository, stream=True,
                                what=f"blob {descriptor.digest.short}")
        with response:
            chunks = response.iter_content(CHUNK)
            try:
                return store.put(chunks, descriptor.digest, descriptor.size,
                                 source=f"{self.host}/{repository} blob {descriptor.digest.short}", progress=progress)
            except requests.exceptions.RequestException as e:
                raise RegistryUnavailable(f"{self.host}: blob {descriptor.digest.short}: transfer failed: {e}",
                                          fix="try again; nothing partial was kept") from None

    def push_blob(self, repository: str, descriptor: Descriptor, open_blob: Callable[[], BinaryIO],
                  mount_from: str | None = None, progress: Progress | None = None) -> PushResult:
        started = self.start_upload(repository, descriptor, mount_from, progress)
        if isinstance(started, PushResult):
            return started
        with open_blob() as blob:
            self.finish_upload(repository, descriptor, started, _Body(blob, descriptor.size, progress))
        return PushResult(descriptor.digest, "uploaded")

    def start_upload(self, repository: str, descriptor: Descriptor, mount_from: str | None = None,
                     progress: Progress | None = None) -> PushResult | str:
        """Skip (the blob exists), mount it from `mount_from`, or open an upload: its URL. Split from
        the PUT so a caller can send a body it streams from elsewhere (`relay`)."""
        if self.has_blob(repository, descriptor.digest):
            if progress:
                progress(descriptor.size)
            return PushResult(descriptor.digest, "exists")
        query = {"mount": str(descriptor.digest), "from": mount_from} if mount_from and mount_from != repository else {}
        start = self.url(repository, "blobs/uploads/") + (f"?{urlencode(query)}" if query else "")
        response = self.request("POST", start, repository, ok=(201, 202), what=f"start upload {descriptor.digest.short}")
        if response.status_code == 201 and query:
            if progress:
                progress(descriptor.size)
            return PushResult(descriptor.digest, "mounted")
        return urljoin(f"{self.scheme}://{self.host}/", response.headers["Location"])

    def finish_upload(self, repository: str, descriptor: Descriptor, location: str, body: Any) -> None:
        """One monolithic PUT of the whole blob to the upload `location` (a sized iterable of chunks:
        Content-Length, no chunked encoding); the registry checks it against `?digest=`."""
        separator = "&" if "?" in location else "?"
        self.request("PUT", f"{location}{separator}digest={descriptor.digest}", repository,
                     headers={"Content-Type": "application/octet-stream"}, data=body, ok=(201, 204),
                     what=f"upload {descriptor.digest.short}")
