"""Registries that demand credentials: htpasswd (Basic) and token (Bearer) auth, end to end.

Credentials come from a Docker config in $DOCKER_CONFIG, inline or through a credential helper,
as they do for users. The token server is a few lines here; distribution verifies its RS256
tokens through the x5c certificate, which chains to the registry's rootcertbundle.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import threading
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from enclaver_rules.oci.layer import Entry
from oci_helpers import make_layout
from services import start_registry

pytestmark = pytest.mark.services

with warnings.catch_warnings():
    # crypt (deprecated in 3.11, gone in 3.13) makes the bcrypt hash htpasswd needs; Debian's 3.11 has it
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt
USER, SECRET = "ci-bot", "s3cret-pass"


def _docker_config(tmp_path: Path, host: str, *, helper: bool) -> Path:
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir(exist_ok=True)
    if helper:
        script = tmp_path / "bin" / "docker-credential-enctest"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f'#!/bin/sh\nread host\necho \'{{"Username": "{USER}", "Secret": "{SECRET}"}}\'\n')
        script.chmod(0o755)
        doc = {"credHelpers": {host: "enctest"}}
    else:
        doc = {"auths": {host: {"auth": base64.b64encode(f"{USER}:{SECRET}".encode()).decode()}}}
    (config_dir / "config.json").write_text(json.dumps(doc))
    return config_dir


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("basic-registry")
    (base / "htpasswd").write_text(f"{USER}:{crypt.crypt(SECRET, crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    gen = start_registry(base, auth=f"auth:\n  htpasswd:\n    realm: test\n    path: {base / 'htpasswd'}\n")
    yield next(gen).address
    gen.close()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues RS256 tokens for the scope asked for, to callers with the right Basic credentials."""

    def __init__(self, base: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclaver test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=1)).sign(self.key, hashes.SHA256()))
        self.bundle = base / "bundle.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.scopes: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                expected = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                scopes = query.get("scope", [])
                server.scopes += scopes
                body = json.dumps({"token": server.token(query["service"][0], scopes)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, service: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(datetime.datetime.now(datetime.UTC).timestamp())
        header = {"alg": "RS256", "typ": "JWT",
                  "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": "enclaver-test", "sub": USER, "aud": service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": str(now), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TokenServer]]:
    base = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(base)
    auth = (f"auth:\n  token:\n    realm: {tokens.url}\n    service: enclaver-test-registry\n"
            f"    issuer: enclaver-test\n    rootcertbundle: {tokens.bundle}\n")
    gen = start_registry(base, auth=auth)
    yield next(gen).address, tokens
    gen.close()
    tokens.httpd.shutdown()


def _round_trip(cli, host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, helper: bool) -> None:  # type: ignore[no-untyped-def]
    layout = tmp_path / "layout"
    digest = make_layout(str(layout), "v", [[Entry.file("secret/app", b"authenticated")]])
    ref = f"{host}/private/app:v"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nowhere"))
    denied = cli("image", "push", f"oci:{layout}:v", ref, "--cache-dir", str(tmp_path / "c0"))
    assert denied.code == 1 and f"log in first (`docker login {host}`)" in denied.stderr
    monkeypatch.setenv("DOCKER_CONFIG", str(_docker_config(tmp_path, host, helper=helper)))
    if helper:
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}")
    pushed = cli("image", "push", f"oci:{layout}:v", ref, "--cache-dir", str(tmp_path / "c1"), "--json")
    assert pushed.code == 0, pushed.stderr
    pulled = cli("image", "pull", ref, "--cache-dir", str(tmp_path / "c2"), "--json")
    assert pulled.code == 0, pulled.stderr
    assert pulled.json()["digest"] == pushed.json()["digest"] == digest
    assert SECRET not in pushed.stderr + pulled.stderr + denied.stderr


def test_basic_auth_with_inline_credentials(cli, basic_registry: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _round_trip(cli, basic_registry, tmp_path, monkeypatch, helper=False)


def test_bearer_tokens_through_a_credential_helper(cli, token_registry, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    host, tokens = token_registry
    _round_trip(cli, host, tmp_path, monkeypatch, helper=True)
    assert "repository:private/app:pull,push" in tokens.scopes and "repository:private/app:pull" in tokens.scopes
