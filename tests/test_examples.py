"""The examples' own code: the no-fly-list service (envelope, lookups, no names in its log) and the
vault image's layout (made with a stand-in binary: HashiCorp's cannot be downloaded here)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nfl = _load("no_fly_list", REPO / "examples" / "no-fly-list" / "app" / "no_fly_list.py")
images = _load("enclaver_examples", REPO / "examples" / "images.py")


def test_an_envelope_opens_only_with_its_key_and_holds_normalized_names() -> None:
    from cryptography.exceptions import InvalidTag

    key, wrapped = os.urandom(32), b"kms-ciphertext-of-the-key"
    envelope = nfl.seal(["Jane  DOE", "john smith", "", "jane doe"], key, wrapped, os.urandom(12))
    asked: list[bytes] = []

    def kms(blob: bytes) -> bytes:
        asked.append(blob)
        return key

    assert nfl.open_envelope(envelope, kms) == frozenset({"jane doe", "john smith"})
    assert asked == [wrapped]  # KMS is asked for exactly the wrapped key
    with pytest.raises(InvalidTag):
        nfl.open_envelope(envelope, lambda _: os.urandom(32))  # another key
    tampered = dict(envelope, list=envelope["list"][:-4] + ("AAAA" if envelope["list"][-4:] != "AAAA" else "BBBB"))
    with pytest.raises(InvalidTag):
        nfl.open_envelope(tampered, kms)
    with pytest.raises(ValueError, match="not a no-fly-list v1 envelope"):
        nfl.open_envelope({**envelope, "format": "other"}, kms)


@pytest.fixture
def service() -> Iterator[str]:
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), nfl.handler(frozenset({"jane doe"})))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_service_answers_lookups_and_logs_no_names(service: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _get(f"{service}/check?name=Jane%20%20Doe") == (200, {"name": "Jane  Doe", "on_list": True})
    assert _get(f"{service}/check?name=Someone%20Else") == (200, {"name": "Someone Else", "on_list": False})
    assert _get(f"{service}/check")[0] == 400
    assert _get(f"{service}/healthz") == (200, {"names": 1})
    assert _get(f"{service}/other")[0] == 404
    logged = capsys.readouterr().err
    assert "GET" in logged and "Jane" not in logged and "Someone" not in logged


def _get_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_guides_passenger_answers(service: str) -> None:
    assert _get_text(f"{service}/enclave/passenger?name=foo") == (200, "foo is cleared to fly. Enjoy your flight!\n")
    assert _get_text(f"{service}/enclave/passenger?name=JANE%20doe") == \
        (200, "JANE doe is on the no-fly list and CAN NOT BOARD!\n")
    assert _get_text(f"{service}/enclave/passenger?name=%20")[0] == 400


def test_the_operator_seals_with_kms_encrypt_and_the_enclave_opens_with_decrypt() -> None:
    """The key policy denies GenerateDataKey outside the enclave: the data key is made here, KMS only
    wraps it (Encrypt), and what Decrypt gives back opens the envelope."""
    kept: dict[bytes, bytes] = {}

    class Kms:
        def encrypt(self, KeyId: str, Plaintext: bytes) -> dict[str, bytes]:  # boto3's names
            wrapped = b"wrapped:" + os.urandom(8)
            kept[wrapped] = Plaintext
            return {"CiphertextBlob": wrapped}

    envelope = nfl.seal_with_kms(["Big Bird", "elmo"], Kms(), "key-1")
    [(wrapped, data_key)] = kept.items()
    assert len(data_key) == 32 and envelope["key"] == base64.b64encode(wrapped).decode()
    assert nfl.open_envelope(envelope, kept.__getitem__) == frozenset({"big bird", "elmo"})


def test_the_vault_image_refuses_without_the_binary_and_is_laid_out_with_one(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from enclaver_rules.errors import InvalidInput
    from enclaver_rules.oci.model import ImageConfig, Manifest
    from enclaver_rules.oci.store import Store

    monkeypatch.delenv("VAULT_BINARY", raising=False)
    with pytest.raises(InvalidInput, match="VAULT_BINARY") as refused:
        images.vault_image.__wrapped__(str(tmp_path / "image"))  # doit's task gets the message, not a traceback
    assert "releases.hashicorp.com" in str(refused.value)

    stand_in = tmp_path / "vault"  # not Vault: a file to lay out where HashiCorp's binary goes
    stand_in.write_bytes(b"\x7fELF stand-in for the static vault binary")
    monkeypatch.setenv("VAULT_BINARY", str(stand_in))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    images.vault_image(str(tmp_path / "image"))
    store = Store(tmp_path / "image")
    descriptor = store.resolve("latest")
    assert descriptor is not None
    manifest = store.manifest(descriptor.digest)
    assert isinstance(manifest, Manifest)
    config = ImageConfig.parse(store.read(manifest.config.digest), "vault config")
    assert list(config.cmd) == ["/bin/vault", "server", "-config=/etc/vault/config.hcl"]
    for path, expected in (("bin/vault", stand_in.read_bytes()),
                           ("etc/vault/config.hcl", (REPO / "examples/vault/app/config.hcl").read_bytes())):
        out = io.BytesIO()
        assert store.copy_file(manifest, path, out) and out.getvalue() == expected
    first = descriptor.digest
    images.vault_image(str(tmp_path / "image"))  # deterministic: the same binary gives the same image
    assert Store(tmp_path / "image").resolve("latest").digest == first  # type: ignore[union-attr]
