"""Secrets are never printed: a canary secret goes in through every door a credential can use (a
reference's user-info, an inline signing key, a registry that echoes our Authorization header, an
exception, a log record, a failing doit task) and must never come out on stdout, stderr or in a log
record, whatever the verbosity (`-vv`) and with `--debug` tracebacks.

Every test fails without `enclaver_rules/redact.py` and its callers. The path tests (1–5) never
import that module themselves, so without the fix they fail on the canary, not on an import; the
module's own tests (6: any password, linear time, ordinary text untouched) need it.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import REPO
from pipeline import doit

USER = "robot"
CANARY = "Cn4ryPw-7f3e9b1d5a"  # the password
TOKEN = "Cn4ryTok-a81c55e0c2d4"  # a Bearer token a registry hands out
BASIC = base64.b64encode(f"{USER}:{CANARY}".encode()).decode()
#: A password holding the characters that end a reference or a word: each fragment is a canary.
ODD_PARTS = ("Qx7Fa", "Qx7Fb", "Qx7Fc")
ODD = f"{ODD_PARTS[0]}/{ODD_PARTS[1]}@{ODD_PARTS[2]}"
SECRETS = (CANARY, TOKEN, BASIC, base64.b64encode(CANARY.encode()).decode(), base64.b64encode(TOKEN.encode()).decode(),
           *ODD_PARTS)


def assert_clean(*texts: str, secrets: tuple[str, ...] = SECRETS) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"{secret!r} printed in:\n{text}"


@pytest.fixture(autouse=True)
def _fresh_redaction() -> Iterator[None]:
    """Each test starts with nothing remembered, so it proves its own path (not an earlier test's)."""
    def forget() -> None:
        try:
            from enclaver_rules import redact
        except ImportError:  # the fix stashed: the tests must still run and fail on the canary
            return
        redact.forget_all()

    forget()
    yield
    forget()


class Records:
    """Every log record created anywhere while installed (raw, before any handler), formatted with
    its traceback when iterated: a secret must not reach logging at all."""

    def __init__(self) -> None:
        self.made: list[logging.LogRecord] = []
        self.formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def __iter__(self) -> Iterator[str]:
        return iter([self.formatter.format(r) for r in self.made])


@pytest.fixture
def records() -> Iterator[Records]:
    """The root logger is at DEBUG meanwhile, so third-party libraries' debug records are made too."""
    captured = Records()
    factory = logging.getLogRecordFactory()

    def capture(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        captured.made.append(record)
        return record

    root = logging.getLogger()
    level = root.level
    logging.setLogRecordFactory(capture)
    root.setLevel(logging.DEBUG)
    yield captured
    root.setLevel(level)
    logging.setLogRecordFactory(factory)


# -- 1. credentials in a reference -----------------------------------------------------------------

REFERENCES = [
    f"{USER}:{CANARY}@registry.example.com/team/app:1.0",
    f"{USER}:{CANARY}@127.0.0.1:5000/app",
    f"{USER}:{CANARY}@registry.example.com:5000",
    f"docker://{USER}:{CANARY}@registry.example.com/app",
    f"docker-daemon:{USER}:{CANARY}@registry.example.com/app:1.0",
    f"https://{USER}:{CANARY}@registry.example.com/app",
    f"{USER}:{CANARY}@registry.example.com/app@sha256:{'a' * 64}",
    f"{USER}:{ODD}@registry.example.com/app",
    f"{USER}:pass {CANARY}@registry.example.com/app",  # whitespace: not a reference at all
]


@pytest.mark.parametrize("ref", REFERENCES)
@pytest.mark.parametrize("command", ["pull", "pull-json", "inspect", "push-dest", "push-src"])
def test_reference_credentials_never_printed(cli, records: Records, tmp_path: Path, ref: str,  # type: ignore[no-untyped-def]
                                             command: str) -> None:
    cache = ("--cache-dir", str(tmp_path / "cache"))
    args = {"pull": ("image", "pull", ref, *cache), "pull-json": ("image", "pull", ref, "--json", *cache),
            "inspect": ("image", "inspect", ref, *cache),
            "push-dest": ("image", "push", f"oci:{tmp_path}/nothing:v", ref, *cache),
            "push-src": ("image", "push", ref, f"oci:{tmp_path}/out:v", *cache)}[command]
    result = cli(*args, "-vv", "--debug")
    assert result.code == 2, result.stderr
    assert_clean(result.stdout, result.stderr, *records)
    assert "***" in result.stderr  # redacted, not dropped: the message still names the reference
    if "registry.example.com" in ref:
        assert "registry.example.com" in result.stderr


MANIFEST = """\
version: v1
name: app
target: {target}
sources:
  app: {app}
"""


@pytest.mark.parametrize("ref", [REFERENCES[0], REFERENCES[3], REFERENCES[7]])
def test_reference_credentials_in_a_manifest(cli, records: Records, in_tmp: Path, ref: str) -> None:  # type: ignore[no-untyped-def]
    (in_tmp / "enclaver.yaml").write_text(MANIFEST.format(target=json.dumps(ref), app=json.dumps(ref)))
    runs = [cli("config", "show", "-vv"), cli("config", "show", "--json", "-vv"),
            cli("config", "show", "--sources-app", ref, env={"ENC_TARGET": ref}),
            cli("config", "show", "--json", "--sources-app", ref, env={"ENC_TARGET": ref}),
            cli("manifest", "check", "--json"), cli("manifest", "explain"), cli("manifest", "explain", "--json")]
    for result in runs:
        assert_clean(result.stdout, result.stderr, *records)
    shown = runs[1].json()["settings"]
    assert shown["sources.app"]["redacted"] is True and shown["sources.app"]["source"] == "enclaver.yaml:5:8"
    assert shown["target"]["value"].count("***") == 1


def test_reference_credentials_in_a_manifest_source_error(cli, records: Records, in_tmp: Path,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`sources.app` resolved for a build: the error names the manifest field, not the password."""
    from enclaver_rules.oci import resolve

    monkeypatch.setenv("DOCKER_CONFIG", str(in_tmp / "no-docker"))
    for ref in REFERENCES:
        with pytest.raises(Exception) as caught:
            resolve.location(ref, file="enclaver.yaml", field="sources.app")
        assert_clean(str(caught.value), *(str(d) for d in getattr(caught.value, "diagnostics", ())))


# -- 2. an inline signing key ----------------------------------------------------------------------


def _key(curve: ec.EllipticCurve, fmt: serialization.PrivateFormat) -> str:
    return ec.generate_private_key(curve).private_bytes(serialization.Encoding.PEM, fmt,
                                                        serialization.NoEncryption()).decode()


def _key_secrets(pem: str) -> tuple[str, ...]:
    """Each line of the key's body is a canary (a 64-character base64 line is plenty to recover it)."""
    return tuple(line for line in pem.splitlines() if line and not line.startswith("-----")) + ("PRIVATE KEY-----",)


def _fingerprint(pem: str) -> str:
    import hashlib

    der = base64.b64decode("".join(line for line in pem.splitlines() if not line.startswith("-----")))
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


SIGNED = """\
version: v1
name: app
target: registry.example.com/app:enclave
sources:
  app: registry.example.com/app:1.0
signature:
  certificate: cert.pem
"""


@pytest.mark.parametrize("style", ["block", "json", "env", "flag", "env-over-file"])
def test_inline_key_never_shown(cli, records: Records, in_tmp: Path, style: str) -> None:  # type: ignore[no-untyped-def]
    key = _key(ec.SECP384R1(), serialization.PrivateFormat.PKCS8)
    other = _key(ec.SECP256R1(), serialization.PrivateFormat.TraditionalOpenSSL)
    in_file = {"block": key, "json": key, "env-over-file": other}.get(style)
    text = SIGNED
    if style == "block":
        text += "  key: |\n" + "".join(f"    {line}\n" for line in key.splitlines())
    elif in_file:
        text += f"  key: {json.dumps(in_file)}\n"
    else:
        text += "  key: signing/key.pem\n"
    (in_tmp / "enclaver.yaml").write_text(text)
    env = {"ENC_SIGNATURE_KEY": key} if style in ("env", "env-over-file") else {}
    flags = ("--signature-key", key) if style == "flag" else ()
    runs = [cli("config", "show", "-vv", *flags, env=env), cli("config", "show", "--json", "-vv", *flags, env=env),
            cli("config", "show", "--debug", *flags, env=env)]
    if style in ("block", "json"):
        runs += [cli("manifest", "check"), cli("manifest", "check", "--json"), cli("manifest", "explain", "--json")]
    secrets = _key_secrets(key) + (_key_secrets(other) if in_file == other else ())
    for result in runs:
        assert_clean(result.stdout, result.stderr, *records, secrets=secrets)
    source = {"block": "enclaver.yaml:8:8", "json": "enclaver.yaml:8:8", "env": "ENC_SIGNATURE_KEY",
              "flag": "--signature-key", "env-over-file": "ENC_SIGNATURE_KEY"}[style]
    row = next(line for line in runs[0].stdout.splitlines() if line.startswith("signature.key"))
    assert _fingerprint(key) in row and source in row, row  # the source and a fingerprint instead
    shown = runs[1].json()["settings"]["signature.key"]
    assert (shown["source"], shown["redacted"], shown["fingerprint"]) == (source, True, _fingerprint(key))
    if style == "env-over-file":  # the conflict warning names both keys, by fingerprint
        assert _fingerprint(other) in runs[0].stderr and shown["overridden"][0]["fingerprint"] == _fingerprint(other)


def test_a_key_path_is_still_shown(cli, in_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    """A path is not a secret: it is shown as written (and the key file is not read)."""
    (in_tmp / "enclaver.yaml").write_text(SIGNED + "  key: signing/key.pem\n")
    result = cli("config", "show", "--json")
    assert result.json()["settings"]["signature.key"]["value"] == "signing/key.pem"
    assert "redacted" not in result.json()["settings"]["signature.key"]
    # …and a key given inline is shown by fingerprint
    key = _key(ec.SECP256R1(), serialization.PrivateFormat.PKCS8)
    inline = cli("config", "show", "--json", env={"ENC_SIGNATURE_KEY": key}).json()["settings"]["signature.key"]
    assert inline["fingerprint"] == _fingerprint(key) and inline["value"].startswith("<inline PEM PRIVATE KEY")


# -- 3. a registry that echoes our credentials -----------------------------------------------------


class EchoRegistry:
    """A registry on 127.0.0.1 that demands credentials (Basic, or Bearer from its /token endpoint,
    which demands Basic) and then refuses every request, quoting the credentials it got in `style`."""

    def __init__(self, auth: str, style: str, status: int, *, token_refuses: bool = False) -> None:
        self.auth, self.style, self.status, self.token_refuses = auth, style, status, token_refuses
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_one(self) -> None:
                got = self.headers.get("Authorization", "")
                if self.path.startswith("/token"):
                    if got == f"Basic {BASIC}" and not owner.token_refuses:
                        self._send(200, json.dumps({"token": TOKEN, "access_token": TOKEN}).encode(),
                                   {"Content-Type": "application/json"})
                    else:  # a token endpoint that echoes what it was sent (oras logs this at debug)
                        self._send(401, f"bad credentials: Authorization: {got}".encode(), {})
                    return
                want = f"Basic {BASIC}" if owner.auth == "basic" else f"Bearer {TOKEN}"
                if got != want:
                    challenge = ('Basic realm="echo"' if owner.auth == "basic" else
                                 f'Bearer realm="http://{owner.host}/token",service="echo",scope="repository:app:pull"')
                    self._send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                               {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
                    return
                if self.command == "HEAD" and self.path.startswith("/v2/app/blobs/"):
                    self._send(404, b"", {})  # push: the blob is missing, so the upload starts
                    return
                credential = got.partition(" ")[2]
                body, headers = owner.body(got, credential)
                self._send(owner.status, body, headers)

            do_GET = do_HEAD = do_POST = do_PUT = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def body(self, header: str, credential: str) -> tuple[bytes, dict[str, str]]:
        decoded = base64.b64decode(credential).decode() if self.auth == "basic" else credential
        text = {
            "json": json.dumps({"errors": [{"code": "DENIED", "message": f"refused Authorization: {header}"}]}),
            "text": f"request was:\r\nGET /v2/app HTTP/1.1\r\nAuthorization: {header}\r\nHost: {self.host}\r\n",
            "repr": f"denied {{'Authorization': '{header}', 'Host': '{self.host}'}}",
            "go": f"denied map[Authorization:[{header}] User-Agent:[enclaver]]",
            "bare": f"unknown credential {credential}",
            "decoded": f"wrong password {decoded.rpartition(':')[2]} for {USER}",
            "json-message": json.dumps({"errors": [{"code": "DENIED", "message": credential}]}),
            "urlencoded": f"denied: auth={urllib.parse.quote(header)}",
        }.get(self.style, "")
        headers = {"Content-Type": "application/json" if self.style.startswith("json") else "text/plain"}
        if self.style == "digest-header":  # echoed where we quote a header: Docker-Content-Digest
            headers["Docker-Content-Digest"] = f"sha256:{credential}"
            text = "{}"
        return text.encode(), headers

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _docker_config(tmp_path: Path, host: str) -> Path:
    directory = tmp_path / "docker-config"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": BASIC}}}))
    return directory


@pytest.fixture
def echo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., EchoRegistry]]:
    started: list[EchoRegistry] = []

    def start(auth: str, style: str, status: int, **kwargs: bool) -> EchoRegistry:
        registry = EchoRegistry(auth, style, status, **kwargs)
        started.append(registry)
        monkeypatch.setenv("DOCKER_CONFIG", str(_docker_config(tmp_path, registry.host)))
        return registry

    yield start
    for registry in started:
        registry.close()


STYLES = ["json", "text", "repr", "go", "bare", "decoded", "json-message", "urlencoded"]


@pytest.mark.parametrize("auth", ["basic", "bearer"])
@pytest.mark.parametrize("style", STYLES)
def test_registry_echoing_credentials_on_pull(cli, records: Records, echo, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              auth: str, style: str) -> None:
    registry = echo(auth, style, 403)
    result = cli("image", "pull", f"{registry.host}/app:1.0", "--cache-dir", str(tmp_path / "c"), "-vv", "--debug")
    assert result.code == 1, result.stderr
    assert "HTTP 403" in result.stderr  # the error is still there, only the secret is gone
    assert_clean(result.stdout, result.stderr, *records)


@pytest.mark.parametrize("status", [400, 401, 404, 500])
def test_registry_echo_whatever_the_status(cli, records: Records, echo, tmp_path: Path, status: int) -> None:  # type: ignore[no-untyped-def]
    registry = echo("bearer", "text", status)
    result = cli("image", "inspect", f"{registry.host}/app:1.0", "--cache-dir", str(tmp_path / "c"), "-vv", "--debug")
    assert result.code == 1, result.stderr
    assert_clean(result.stdout, result.stderr, *records)


@pytest.mark.parametrize("auth", ["basic", "bearer"])
@pytest.mark.parametrize("style", ["json", "bare", "decoded"])
def test_registry_echoing_credentials_on_push(cli, records: Records, echo, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              auth: str, style: str) -> None:
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout

    layout = tmp_path / "layout"
    make_layout(str(layout), "v", [[Entry.file("app", b"x")]])
    registry = echo(auth, style, 400)
    result = cli("image", "push", f"oci:{layout}:v", f"{registry.host}/app:v", "--cache-dir", str(tmp_path / "c"),
                 "-vv", "--debug", "--json")
    assert result.code == 1, result.stderr
    assert_clean(result.stdout, result.stderr, *records)


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_registry_echoing_credentials_in_a_header(echo, records: Records, auth: str) -> None:  # type: ignore[no-untyped-def]
    """Docker-Content-Digest is quoted in errors: a registry can put our credential there."""
    from enclaver_rules.errors import EnclaverError
    from enclaver_rules.oci.registry import Registry

    registry = echo(auth, "digest-header", 200)
    client = Registry(registry.host, retries=0)
    for call in (lambda: client.get_manifest("app", "1.0"), lambda: client.head_manifest("app", "1.0")):
        with pytest.raises(EnclaverError) as caught:
            call()
        assert_clean(str(caught.value), *(str(d) for d in caught.value.diagnostics), *records)


def test_credentials_from_a_helper_and_through_oras(cli, records: Records, echo, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials that come through oras: from a credential helper (then echoed, decoded, by the
    registry), a helper that fails with the secret on its stderr, and a token endpoint that refuses
    and echoes our Basic header. oras logs the last two (muted since before; kept muted at -vv)."""
    helper = tmp_path / "bin" / "docker-credential-enctest"
    helper.parent.mkdir()
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    scripts = {"works": f"#!/bin/sh\necho '{{\"Username\": \"{USER}\", \"Secret\": \"{CANARY}\"}}'\n",
               "fails": f"#!/bin/sh\necho 'cannot unlock {USER}:{CANARY} Authorization: Basic {BASIC}' >&2\nexit 1\n"}
    for script, auth, kwargs in (("works", "basic", {}), ("works", "bearer", {}), ("fails", "bearer", {}),
                                 ("works", "bearer", {"token_refuses": True})):
        registry = echo(auth, "decoded", 403, **kwargs)
        helper.write_text(scripts[script])
        helper.chmod(0o755)
        (tmp_path / "docker-config" / "config.json").write_text(json.dumps({"credHelpers": {registry.host: "enctest"}}))
        result = cli("image", "pull", f"{registry.host}/app:1.0", "--cache-dir", str(tmp_path / "c"), "-vv", "--debug")
        assert result.code == 1, result.stderr
        assert_clean(result.stdout, result.stderr, *records)


# -- 4. exceptions, --debug tracebacks and logs ----------------------------------------------------

LEAKS = [
    f"connect to https://{USER}:{CANARY}@registry.example.com/v2/ failed",
    f"headers {{'Authorization': 'Basic {BASIC}'}}",
    f"Authorization: Bearer {TOKEN}",
    f"token={TOKEN}&scope=x",
    f'{{"password": "{CANARY}"}}',
]


@pytest.mark.parametrize("leak", LEAKS)
def test_internal_error_and_debug_traceback(cli, records: Records, in_tmp: Path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                            leak: str) -> None:
    import enclaver_rules.cli.config as config_cmd
    from enclaver_rules.errors import OperationFailed

    def internal(*args: object) -> None:
        raise RuntimeError(leak)

    def chained(*args: object) -> None:
        try:
            raise ConnectionError(leak)
        except ConnectionError as e:
            raise OperationFailed(f"cannot reach the registry: {e}", fix="retry") from e

    for boom, code in ((internal, 3), (chained, 1)):
        monkeypatch.setattr(config_cmd, "resolve", boom)
        for flags in (("--debug",), ("-vv", "--debug"), ()):
            result = cli("config", "show", *flags)
            assert result.code == code
            assert_clean(result.stdout, result.stderr, *records)
            if flags:
                assert "Traceback" in result.stderr


@pytest.mark.parametrize("leak", LEAKS)
def test_log_records_are_redacted_when_printed(cli, in_tmp: Path, monkeypatch: pytest.MonkeyPatch, leak: str) -> None:  # type: ignore[no-untyped-def]
    """Whoever logs a secret (ours at -vv, or a library's warning), the printed line is clean."""
    import enclaver_rules.cli.config as config_cmd
    from enclaver_rules.errors import InvalidInput

    def noisy(*args: object) -> None:
        logging.getLogger("enclaver.test").debug("sending %s", leak)
        logging.getLogger("enclaver.test").warning(leak)
        try:
            raise ValueError(leak)
        except ValueError:
            logging.getLogger("enclaver.test").exception("failed")
        logging.getLogger("urllib3.connectionpool").warning("retrying: %s", leak)
        raise InvalidInput("stop")

    monkeypatch.setattr(config_cmd, "resolve", noisy)
    result = cli("config", "show", "-vv")
    assert "sending" in result.stderr and "retrying" in result.stderr and "failed" in result.stderr
    assert_clean(result.stdout, result.stderr)


# -- 5. doit task failures -------------------------------------------------------------------------


@pytest.mark.parametrize("leak", LEAKS)
def test_task_failures_are_redacted(leak: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from enclaver_rules.errors import InvalidInput
    from enclaver_rules.rules.common import reported

    monkeypatch.setenv("ENC_DEBUG", "1")
    errors: list[BaseException] = [InvalidInput(leak, file="enclaver.yaml", field="sources.app"),
                                   OSError(2, leak, f"/srv/{USER}:{CANARY}@host/app"), RuntimeError(leak)]
    for error in errors:
        def action(error: BaseException = error) -> None:
            raise error

        failed = reported(action)()
        assert failed is not None and not isinstance(failed, dict)
        assert_clean(str(failed), failed.get_msg())
    out, err = capfd.readouterr()
    assert "Traceback" in err
    assert_clean(out, err)


def test_doit_build_with_credentials_in_sources(monorepo: Path) -> None:
    """End to end: `doit build:<name>` and `enclaver build` fail on `sources.app`, without the password."""
    manifest = monorepo / "services" / "alpha" / "enclaver.yaml"
    manifest.write_text(manifest.read_text().replace(
        "app: oci:app:latest", f"app: \"{USER}:{CANARY}@registry.example.com/app:1.0\""))
    env = {"ENC_DEBUG": "1", "DOCKER_CONFIG": str(monorepo / "no-docker")}
    result = doit(monorepo, "build:alpha", env=env)
    assert result.returncode != 0
    assert "sources.app" in result.stdout + result.stderr
    assert_clean(result.stdout, result.stderr)
    build = subprocess.run([sys.executable, "-m", "enclaver_rules.cli", "build", "-f", str(manifest), "-vv", "--debug"],
                           cwd=monorepo, capture_output=True, text=True, timeout=600,
                           env={**os.environ, **env, "PYTHONPATH": str(REPO)})
    assert build.returncode != 0
    assert "sources.app" in build.stdout + build.stderr
    assert_clean(build.stdout, build.stderr)


# -- 6. the redaction itself: any password, bounded time, and no damage to ordinary text -----------

from hypothesis import given  # noqa: E402 - the module's own tests, kept apart from the paths above
from hypothesis import strategies as st  # noqa: E402

PASSWORDS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).map(lambda p: f"Zq9{p}")


@given(password=PASSWORDS, user=st.sampled_from(["", "robot", "x-access-token"]),
       rest=st.sampled_from(["registry.example.com/app:1.0", "127.0.0.1:5000/app", "host",
                             f"host/app@sha256:{'c' * 64}"]),
       transport=st.sampled_from(["", "docker://", "docker-daemon:", "https://"]))
def test_a_reference_never_shows_its_password(password: str, user: str, rest: str, transport: str) -> None:
    from enclaver_rules.oci.reference import BadReference, parse_image
    from enclaver_rules.redact import reference

    ref = f"{transport}{user}:{password}@{rest}"
    assert "Zq9" not in reference(ref)
    try:
        parse_image(ref)
    except BadReference as e:
        assert "Zq9" not in e.message + e.fix
    else:
        raise AssertionError(f"{ref!r} was accepted")


def test_redaction_takes_linear_time() -> None:
    """Messages quote what servers send: a hostile megabyte must not stall the printer."""
    import time

    from enclaver_rules.redact import text

    for hostile in ("A" * 1_000_000 + " a@b", "x@" * 200_000, "password=" * 100_000, "Authorization: " * 100_000,
                    "-----BEGIN PRIVATE KEY-----" * 20_000, "a-" * 300_000 + "token: x", "Bearer " * 100_000):
        start = time.monotonic()
        text(hostile)
        assert time.monotonic() - start < 5, hostile[:40]


ORDINARY = [
    f"busybox:1.0@sha256:{'a' * 64}", f"localhost:5000/app@sha256:{'b' * 64}", "git@github.com:org/repo.git",
    "enclaver.yaml:7:3: egress.allow[0]: '*.*' matches every host — name the hosts",
    "/srv/secrets/enclaver.yaml: cannot read the manifest: no such file",
    "invalid YAML: found character '\\t' that cannot start any token — indent with spaces, not tabs",
    "signature.key: give an unencrypted EC private key in PEM", "Basic authentication required",
    'WWW-Authenticate: Bearer realm="https://auth.example.com/token",service="registry"',
    "PCR0 2c93f33acc1137d69927a08a1edd6057b82ed3d97641dcfd85c3590a39eccab131620dad7f74e367ef53d6be2361bcdd",
    "@functools.wraps(action)",
]


@pytest.mark.parametrize("message", ORDINARY)
def test_ordinary_text_is_left_alone(message: str) -> None:
    from enclaver_rules.redact import text

    assert text(message) == message
