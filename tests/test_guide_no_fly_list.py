"""The no-fly-list guide end to end, as examples/no-fly-list/run.py does it for a user (its functions, not
a copy of them): the app image made here from Debian's packages (mmdebstrap), the enclave built
(`enclaver build -f examples/no-fly-list/enclaver.sim.yaml`), `enclaver trust --kms-policy`, a key in
the real local KMS (`enclaver kms serve`) under that policy, the list sealed and uploaded to a real S3
server (moto's, a subprocess on 127.0.0.1), then `enclaver run --simulate --sim-kms` in the real Docker
engine: the app fetches the envelope through odyn's egress, gets the data key through odyn's KMS proxy
with the simulated enclave's attestation, and answers on ingress 8001. With a key policy for other
PCRs the local KMS refuses the data key, the app says why and exits 3, and `enclaver run` exits 3.

Never skipped: without Docker, mmdebstrap or moto the fixtures fail with the reason."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guide_helpers import checkout, guide, refused_policy, simulator_containers, trusted_policy
from services import Dockerd, free_port

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def built(template: Path, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    """A checkout in which the guide's first step ran: the Guide and the build directory."""
    yield checkout(template, dockerd, tmp_path_factory.mktemp("guide") / "repo")


@pytest.fixture(scope="module")
def s3(built: tuple[Any, Path]) -> Iterator[tuple[str, int]]:
    with guide.s3_server(built[0].work, built[0].env) as server:
        yield server


def test_the_enclave_answers_lookups_with_the_list_it_decrypted(built: tuple[Any, Path], s3: tuple[str, int],
                                                                 dockerd: Dockerd) -> None:
    the_guide, build_dir = built
    started = time.monotonic()
    policy = trusted_policy(the_guide, build_dir)
    key_id = the_guide.provision(policy, s3[0], guide.read_names())
    port = free_port()
    with the_guide.enclave(build_dir, s3[1], port) as enclave:
        enclave.wait_serving()
        serving = time.monotonic()
        assert enclave.ask("foo") == "foo is cleared to fly. Enjoy your flight!"
        assert enclave.ask("Big Bird") == "Big Bird is on the no-fly list and CAN NOT BOARD!"
        assert enclave.ask("cookie MONSTER") == "cookie MONSTER is on the no-fly list and CAN NOT BOARD!"
        assert enclave.ask("Kermit the Frog") == "Kermit the Frog is cleared to fly. Enjoy your flight!"
    print(f"trust, key and upload, then serving: {serving - started:.0f} s")
    assert enclave.code == 109, enclave.output  # stopped by SIGTERM, after the final status and logs
    assert "no-fly-list: 14 names loaded; serving on :8001" in enclave.stdout, enclave.output
    assert not any("Big Bird" in line or "foo" in line for line in enclave.stdout)  # the log names nobody
    moto_log = (the_guide.work / "moto.log").read_text()
    assert "GET /no-fly-list/no-fly-list.json" in moto_log  # the app's fetch reached the S3 server, via egress
    assert f"sim-host: {guide.S3_NAME} → 127.0.0.1:{s3[1]}" in enclave.stderr
    assert "1 key(s) in" in (the_guide.work / "kms" / "kms.log").read_text()  # --sim-kms's KMS had the key
    assert any(key_id in p.name for p in (the_guide.work / "kms" / "keys").iterdir())
    assert not simulator_containers(dockerd)


def test_a_key_policy_for_other_pcrs_keeps_the_list_sealed(built: tuple[Any, Path], s3: tuple[str, int],
                                                           dockerd: Dockerd, tmp_path: Path) -> None:
    """Another build's PCR0 in the policy: KMS's attestation condition fails, the explicit deny
    backstop answers, the app says so and exits 3, and `enclaver run` exits with the app's code."""
    the_guide, build_dir = built
    policy = refused_policy(the_guide, guide, build_dir, tmp_path)
    the_guide.provision(policy, s3[0], guide.read_names())
    with the_guide.enclave(build_dir, s3[1], free_port()) as enclave:
        code = enclave.wait()
    assert code == 3, enclave.output
    refusal = next((line for line in enclave.stdout if "KMS refused the data key" in line), "")
    assert "AccessDeniedException" in refusal and "explicit deny in a resource-based policy" in refusal, enclave.output
    assert "kms:RecipientAttestation" in refusal and "PCR0" in refusal
    assert "enclave: exited code 3" in enclave.stderr and "exit code 3" in enclave.stderr
    assert not simulator_containers(dockerd)
