#!/usr/bin/env python3
"""OpenBao (the open-source fork of Vault) in an enclave: the app enclaver runs. It starts `bao server`
only once KMS has released the seal key to this enclave, so a node unseals itself (auto-unseal) only
when its attestation matches the key policy.

At start, in order:

1. **Settings** from the parent, through odyn's egress proxy: `GET $VAULT_SETTINGS_URL`, a JSON
   document naming this node, every node's API and cluster addresses, and the seal key as a KMS
   ciphertext (format below). Nothing in it is secret: the parent can rename nodes or point them
   elsewhere (availability), and the ciphertext opens only in an enclave whose measurements the
   key policy names.
2. **The seal key**: KMS `Decrypt` of that ciphertext through odyn's KMS proxy
   (`$AWS_ENDPOINT_URL_KMS`), which attaches this enclave's attestation document; KMS releases the
   key only when the document's PCRs match the key policy, and seals it to the proxy's key. If KMS
   refuses, this node stays sealed: bao is never started, the refusal is printed, and the app exits 3.
3. **Peers**: bao dials the other nodes' API (raft join) and cluster addresses (raft, request
   forwarding) itself and knows nothing of proxies, and an enclave has no network but odyn's. So
   each name in the addresses gets a loopback address in /etc/hosts (127.0.1.N), and on it, per
   port, a forwarder: for another node's address it opens a CONNECT tunnel through odyn's egress
   proxy (the manifest's policy decides, and the host checks again) and then copies bytes both ways
   untouched, so bao's mTLS runs end to end, from this bao to the other node's, which receives it
   through its ingress; for this node's own addresses it connects to bao's listener here.
4. **bao server** with /etc/openbao/server.hcl (in the image) and a config written to a tmpfs,
   /dev/shm/openbao/node.hcl (0600): the node's addresses, its raft storage with `retry_join` to the
   other nodes, and `seal "static"` holding the key. The key is never written to a disk (an enclave
   has none; /dev/shm is a tmpfs in Nitro's init and in Docker) and never printed.

bao runs in its own process group: SIGTERM and SIGINT reach it once, from here; the app exits with
bao's code.

Settings (`VAULT_SETTINGS_URL`), version 1:

    {"format": "enclaver-vault-node/1",
     "node_id": "vault-1",
     "nodes": {"vault-1": {"api_addr": "http://host:8200", "cluster_addr": "https://host:8201"},
               "vault-2": {"api_addr": "...", "cluster_addr": "...", "non_voter": false}},
     "seal": {"key_id": "kms-1", "ciphertext": "<base64 CiphertextBlob>"}}

Addresses name hosts (the egress policy judges names; an enclave has no route to an IP address), and
no two share a host and port. `non_voter` makes a node join raft without a vote.

Exit codes: 3 KMS refused the seal key (the node stays sealed); 4 no usable settings; 5 no tmpfs for
the key, or a forwarder could not listen; 6 KMS could not be reached; otherwise bao's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import http.client
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "enclaver-vault-node/1"
#: Bound to the ciphertext (KMS encryption context): a ciphertext made for another purpose under the same
#: key does not open as the seal key. The operator uses the same context (vault/run.py).
SEAL_CONTEXT = {"purpose": "openbao-static-seal"}
BAO = "/usr/local/bin/bao"
SERVER_CONFIG = "/etc/openbao/server.hcl"
TMPFS = Path("/dev/shm")
NODE_CONFIG = TMPFS / "openbao" / "node.hcl"
DATA_DIR = "/var/lib/openbao/raft"
HOSTS = Path("/etc/hosts")
LOCAL_API, LOCAL_CLUSTER = ("127.0.0.1", 8200), ("127.0.0.1", 8201)  # server.hcl's listener
KMS_REFUSED, NO_SETTINGS, NO_PLACE, KMS_UNREACHABLE = 3, 4, 5, 6
SETTINGS_WAIT = 60.0  # seconds to keep asking for the settings while the parent's server is not up
KMS_WAIT = 90.0  # seconds to keep trying KMS while it (or the proxy's credentials) is not reachable
TUNNEL_TIMEOUT = 70.0  # odyn's egress proxy answers a CONNECT within 60 s
_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def say(text: str) -> None:
    print(f"vault-start: {text}", flush=True)


class Stop(Exception):
    """End the app with `code`, after saying `text`."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


# -- settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Node:
    name: str
    api: Address
    cluster: Address
    non_voter: bool = False


@dataclass(frozen=True)
class Settings:
    node_id: str
    nodes: tuple[Node, ...]
    seal_key_id: str
    ciphertext: bytes

    @property
    def me(self) -> Node:
        return next(n for n in self.nodes if n.name == self.node_id)

    @property
    def others(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.name != self.node_id)


def parse_address(text: Any, where: str, schemes: tuple[str, ...]) -> Address:
    if not isinstance(text, str):
        raise ValueError(f"{where}: not a string")
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    if parts.scheme not in schemes or port is None or parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"{where}: {text!r} is not {' or '.join(s + '://NAME:PORT' for s in schemes)}")
    if not _NAME.fullmatch(host) or host.replace(".", "").isdigit() or host.lower() == "localhost":
        raise ValueError(f"{where}: {host!r} is not a host name (addresses name hosts: an enclave has no route to "
                         "an IP address, and the egress policy judges names)")
    return Address(parts.scheme, host.lower(), port)


def parse_settings(data: bytes) -> Settings:
    """The settings document, checked; ValueError saying what is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} document")
    node_id, nodes, seal = doc.get("node_id"), doc.get("nodes"), doc.get("seal")
    if not isinstance(node_id, str) or not _ID.fullmatch(node_id):
        raise ValueError(f"node_id {node_id!r} is not a name of letters, digits, '.', '_' and '-'")
    if not isinstance(nodes, dict) or node_id not in nodes:
        raise ValueError(f"nodes must be an object that names this node, {node_id}")
    parsed = []
    for name, entry in sorted(nodes.items()):
        if not _ID.fullmatch(name) or not isinstance(entry, dict):
            raise ValueError(f"nodes.{name}: not a node name with an object")
        non_voter = entry.get("non_voter", False)
        if not isinstance(non_voter, bool):
            raise ValueError(f"nodes.{name}.non_voter: not true or false")
        parsed.append(Node(name, parse_address(entry.get("api_addr"), f"nodes.{name}.api_addr", ("http", "https")),
                           parse_address(entry.get("cluster_addr"), f"nodes.{name}.cluster_addr", ("https",)),
                           non_voter))
    seen: dict[tuple[str, int], str] = {}
    for node in parsed:
        for field, address in (("api_addr", node.api), ("cluster_addr", node.cluster)):
            spot, where = (address.host, address.port), f"nodes.{node.name}.{field}"
            if spot in seen:
                raise ValueError(f"{where}: {address.host}:{address.port} is {seen[spot]} already")
            seen[spot] = where
    if not isinstance(seal, dict) or not isinstance(seal.get("key_id"), str) or not _ID.fullmatch(seal["key_id"]):
        raise ValueError("seal.key_id: not a name of letters, digits, '.', '_' and '-'")
    try:
        ciphertext = base64.b64decode(seal.get("ciphertext", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError("seal.ciphertext: not base64") from None
    if not 0 < len(ciphertext) <= 6144:
        raise ValueError("seal.ciphertext: not a KMS ciphertext (1 to 6144 bytes)")
    return Settings(node_id, tuple(parsed), seal["key_id"], ciphertext)


def fetch_settings(url: str, wait: float = SETTINGS_WAIT) -> Settings:
    """GET `url` through the egress proxy (urllib follows odyn's HTTP_PROXY), until it answers or `wait` ends."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as reply:
                data = reply.read(1 << 20)
            break
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace").strip()
            if e.code < 500:
                raise Stop(NO_SETTINGS, f"no settings from {url}: {e.code} {e.reason} {detail}".rstrip()) from None
            why = f"{e.code} {e.reason} {detail}".rstrip()
        except (OSError, http.client.HTTPException) as e:
            why = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise Stop(NO_SETTINGS, f"no settings from {url} within {wait:g} s: {why}")
        time.sleep(1)
    try:
        return parse_settings(data)
    except ValueError as e:
        raise Stop(NO_SETTINGS, f"the settings from {url} are not usable: {e}") from None


# -- the seal key, from KMS through odyn's KMS proxy ----------------------------------------------------------


class KmsError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


def kms_decrypt(endpoint: str, region: str, ciphertext: bytes, context: dict[str, str],
                timeout: float = 70.0) -> tuple[str, bytes]:
    """(KeyId, plaintext) of KMS Decrypt, POSTed to odyn's KMS proxy as any AWS SDK would (AWS JSON 1.1).

    There are no AWS credentials in the enclave, and none are needed: the proxy reads only the region
    and service of the request's SigV4 credential scope, never checks the signature (only processes in
    the enclave reach it), attaches the attestation document, and signs again with the parent instance's
    role. Raises KmsError for an error answer, OSError when the proxy is not reachable."""
    where = urllib.parse.urlsplit(endpoint)
    body = json.dumps({"CiphertextBlob": base64.b64encode(ciphertext).decode(), "EncryptionContext": context})
    scope = f"enclave/{time.strftime('%Y%m%d', time.gmtime())}/{region}/kms/aws4_request"
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.Decrypt",
               "Authorization": f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders=content-type;host;x-amz-target, "
                                f"Signature={'0' * 64}"}
    connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port or 80, timeout=timeout)
    try:
        connection.request("POST", "/", body, headers)
        reply = connection.getresponse()
        data = reply.read(1 << 20)
    finally:
        connection.close()
    try:
        answer = json.loads(data) if data else {}
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if reply.status != 200:
        code = str(answer.get("__type", "")).rpartition("#")[2] or f"HTTP {reply.status}"
        message = str(answer.get("message") or answer.get("Message") or data[:300].decode("utf-8", "replace"))
        raise KmsError(reply.status, code, message)
    try:
        return str(answer["KeyId"]), base64.b64decode(answer["Plaintext"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise KmsError(reply.status, "BadAnswer", "KMS's answer has no KeyId and Plaintext") from None


def seal_key(settings: Settings, wait: float = KMS_WAIT) -> tuple[str, bytes]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_KMS") or os.environ.get("AWS_KMS_ENDPOINT")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not endpoint:
        raise Stop(KMS_UNREACHABLE, "no KMS proxy: the manifest needs kms_proxy (odyn then sets AWS_ENDPOINT_URL_KMS)")
    deadline, pause = time.monotonic() + wait, 1.0
    while True:
        try:
            key_id, key = kms_decrypt(endpoint, region, settings.ciphertext, SEAL_CONTEXT)
            break
        except KmsError as e:
            if e.status < 500 and e.code not in ("ThrottlingException", "KMSInternalException"):
                raise Stop(KMS_REFUSED, refusal(e)) from None
            why = str(e)
        except (OSError, http.client.HTTPException) as e:
            why = f"{type(e).__name__}: {e}"
        if time.monotonic() + pause > deadline:
            raise Stop(KMS_UNREACHABLE, f"KMS did not answer within {wait:g} s ({why}): this node stays sealed")
        time.sleep(pause)
        pause = min(pause * 2, 10.0)
    if len(key) != 32:
        raise Stop(KMS_REFUSED, f"KMS key {key_id} released {len(key)} bytes, not a 32-byte AES-256 seal key: "
                                "this node stays sealed")
    return key_id, key


def refusal(e: KmsError) -> str:
    text = f"KMS refused the seal key: {e.code}: {e.message.rstrip('.')}."
    if e.code == "AccessDeniedException":
        text += (" The key policy releases the seal key only to an enclave whose attestation matches its "
                 "kms:RecipientAttestation conditions (PCR0, the image's measurement): this enclave's measurements "
                 "are not the ones it names.")
    return text + " This node stays sealed: bao is not started."


# -- peers: loopback names and forwarders ---------------------------------------------------------------


def loopback_names(settings: Settings) -> dict[str, str]:
    """Each host name of the addresses → a loopback address of its own (127.0.1.N), for /etc/hosts."""
    names = sorted({a.host for n in settings.nodes for a in (n.api, n.cluster)})
    if len(names) > 250:
        raise Stop(NO_SETTINGS, f"the settings name {len(names)} hosts, more than 250")
    return {name: f"127.0.1.{i + 1}" for i, name in enumerate(names)}


def add_hosts(names: dict[str, str], path: Path = HOSTS) -> None:
    """Append `address name` lines for these names (replacing lines this app wrote before)."""
    mark = "# vault_start.py"
    try:
        kept = [line for line in path.read_text().splitlines() if not line.endswith(mark)]
    except FileNotFoundError:
        kept = ["127.0.0.1\tlocalhost"]
    kept += [f"{address}\t{name}\t{mark}" for name, address in names.items()]
    path.write_text("\n".join(kept) + "\n")


@dataclass(frozen=True)
class Route:
    """A forwarder: (listen address, port) → the peer `name:port` through egress, or `local` here."""

    listen: tuple[str, int]
    name: str
    port: int
    local: tuple[str, int] | None = None  # this node's own address: straight to bao's listener


def routes(settings: Settings, names: dict[str, str]) -> list[Route]:
    out = []
    for node in settings.nodes:
        mine = node.name == settings.node_id
        for address, local in ((node.api, LOCAL_API), (node.cluster, LOCAL_CLUSTER)):
            out.append(Route((names[address.host], address.port), address.host, address.port, local if mine else None))
    return out


def egress_proxy() -> tuple[str, int]:
    """odyn's egress proxy, from the HTTP_PROXY it sets for the app."""
    url = os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy") or ""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or not parts.port:
        raise Stop(NO_PLACE, f"no egress proxy (HTTP_PROXY={url!r}): the manifest needs egress.allow")
    return parts.hostname, parts.port


async def tunnel(proxy: tuple[str, int], name: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT tunnel to name:port through odyn's egress proxy; OSError with the proxy's answer if refused."""
    reader, writer = await asyncio.open_connection(*proxy)
    try:
        writer.write(f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n".encode("ascii"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TUNNEL_TIMEOUT)
    except BaseException:
        writer.transport.abort()
        raise
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status.split(" ")[1:2] != ["200"]:
        text = (await reader.read(500)).decode("utf-8", "replace").strip()
        writer.transport.abort()
        raise OSError(f"odyn's egress proxy answered {status!r} for {name}:{port}: {text}")
    return reader, writer  # what the reader holds after the head is the peer's first bytes: passed on as they are


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then pass the half-close on."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class Forwarders:
    def __init__(self, proxy: tuple[str, int]) -> None:
        self.proxy = proxy
        self.servers: list[asyncio.AbstractServer] = []
        self.last_said: dict[tuple[str, int], float] = {}

    async def start(self, routes: list[Route]) -> None:
        for route in routes:
            try:
                server = await asyncio.start_server(functools.partial(self.handle, route), *route.listen,
                                                    reuse_address=True)
            except OSError as e:
                raise Stop(NO_PLACE, f"cannot listen on {route.listen[0]}:{route.listen[1]} for {route.name}:"
                                     f"{route.port}: {e.strerror or e}") from None
            self.servers.append(server)

    async def handle(self, route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if route.local is not None:
                up_reader, up_writer = await asyncio.open_connection(*route.local)
            else:
                up_reader, up_writer = await tunnel(self.proxy, route.name, route.port)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as e:
            self.note(route, f"{route.name}:{route.port} not reachable: {e}")
            writer.transport.abort()
            return
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    def note(self, route: Route, text: str) -> None:
        """Say it, at most once a minute per route (bao retries every few seconds)."""
        now = time.monotonic()
        if now - self.last_said.get(route.listen, -3600.0) >= 60.0:
            self.last_said[route.listen] = now
            say(text)

    def close(self) -> None:
        for server in self.servers:
            server.close()


# -- bao ------------------------------------------------------------------------------------------------


def hcl(value: str) -> str:
    return json.dumps(value)  # the values are checked names and URLs: JSON's quoting is HCL's


def node_config(settings: Settings, key: bytes, data_dir: str = DATA_DIR) -> str:
    me = settings.me
    lines = ["# written by vault_start.py at start, on a tmpfs: this node's part of the configuration",
             f"api_addr     = {hcl(str(me.api))}", f"cluster_addr = {hcl(str(me.cluster))}", "",
             'storage "raft" {', f"  path    = {hcl(data_dir)}", f"  node_id = {hcl(me.name)}"]
    if me.non_voter:
        lines.append("  retry_join_as_non_voter = true")
    for node in settings.others:
        lines += ["  retry_join {", f"    leader_api_addr = {hcl(str(node.api))}", "  }"]
    lines += ["}", "", 'seal "static" {', f"  current_key_id = {hcl(settings.seal_key_id)}",
              f"  current_key    = {hcl(key.hex())}", "}", ""]
    return "\n".join(lines)


def write_private(path: Path, text: str) -> None:
    """`text` into `path` (0600, its directory 0700), on a tmpfs only: NO_PLACE otherwise."""
    if not is_tmpfs(TMPFS):
        raise Stop(NO_PLACE, f"{TMPFS} is not a tmpfs here: the seal key is written to memory only, never to a disk")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def is_tmpfs(path: Path, mounts: str = "/proc/self/mounts") -> bool:
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return False
    types = {fields[1]: fields[2] for fields in (line.split() for line in lines) if len(fields) > 2}
    return types.get(str(path)) == "tmpfs"


def bao_environment() -> dict[str, str]:
    """bao reaches peers through the forwarders only: no proxy settings, no AWS settings."""
    drop = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
    return {k: v for k, v in os.environ.items() if k.upper() not in drop and not k.startswith("AWS_")}


async def run(settings: Settings, key: bytes) -> int:
    names = loopback_names(settings)
    add_hosts(names)
    forwarders = Forwarders(egress_proxy())
    table = routes(settings, names)
    await forwarders.start(table)
    for route in table:
        where = "this node's listener" if route.local else "egress"
        say(f"{route.name}:{route.port} → {where} (listening on {route.listen[0]}:{route.listen[1]})")
    write_private(NODE_CONFIG, node_config(settings, key))
    Path(DATA_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    me = settings.me
    role = "non-voter" if me.non_voter else "voter"
    say(f"starting bao server: node {me.name} ({role}), api {me.api}, cluster {me.cluster}, retry_join "
        f"{', '.join(str(n.api) for n in settings.others) or 'none'}; seal \"static\" in {NODE_CONFIG} (tmpfs)")
    stop = Signals()
    bao = await asyncio.create_subprocess_exec(BAO, "server", f"-config={SERVER_CONFIG}", f"-config={NODE_CONFIG}",
                                               env=bao_environment(), process_group=0)
    stop.process = bao
    for signum in stop.pending:  # one came while bao was starting
        stop.pass_on(signum)
    code = await bao.wait()
    forwarders.close()
    say(f"bao server exited with code {code}")
    return code if code >= 0 else 128 - code


class Signals:
    """SIGTERM and SIGINT, passed on to bao (its own process group: odyn's signal to ours misses it)."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self.pending: list[int] = []
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.pass_on, signum)

    def pass_on(self, signum: int) -> None:
        if self.process is None:
            self.pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)


def main() -> int:
    url = os.environ.get("VAULT_SETTINGS_URL", "")
    try:
        if not url:
            raise Stop(NO_SETTINGS, "VAULT_SETTINGS_URL is not set (the image's configuration names it)")
        settings = fetch_settings(url)
        say(f"settings from {url}: node {settings.node_id} of {len(settings.nodes)} "
            f"({', '.join(n.name for n in settings.nodes)})")
        key_id, key = seal_key(settings)
        say(f"seal key {settings.seal_key_id} released by KMS key {key_id} to this enclave (Decrypt with its "
            "attestation, through odyn's KMS proxy)")
        return asyncio.run(run(settings, key))
    except Stop as e:
        say(str(e))
        return e.code


if __name__ == "__main__":
    sys.exit(main())
