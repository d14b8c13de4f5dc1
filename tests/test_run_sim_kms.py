"""`enclaver run --simulate --sim-kms/--sim-imds`: the local KMS and IMDS started for the enclave's KMS
proxy. Without Docker: the commands built, the refusals, and the real child processes (boto3 against the
KMS as the parent identity; the IMDS's credentials), gone after stop."""

from __future__ import annotations

import json
import stat
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.config import Config

from enclaver_rules.cli.run import check_sim_service_egress, debug_mode_warning
from enclaver_rules.errors import InvalidInput
from enclaver_rules.manifest.model import KmsProxy
from enclaver_rules.runtime.simulator import (
    IMDS_ADDRESS,
    SIM_PARENT_ROLE,
    imds_command,
    kms_command,
    sim_kms_target,
    start_sim_services,
)


def manifest(endpoints: dict[str, str] | None) -> Any:
    return SimpleNamespace(kms_proxy=KmsProxy(9999, tuple(sorted(endpoints.items()))) if endpoints is not None
                           else None)


def test_target_is_the_http_endpoint() -> None:
    target = sim_kms_target(manifest({"eu-west-1": "kms.eu-west-1.amazonaws.com",
                                      "us-east-1": "http://kms.sim.internal:4566"}))
    assert (target.region, target.host, target.port) == ("us-east-1", "kms.sim.internal", 4566)
    assert sim_kms_target(manifest({"us-east-1": "http://kms.sim.internal"})).port == 80


@pytest.mark.parametrize("endpoints", [None, {}, {"us-east-1": "kms.us-east-1.amazonaws.com"},
                                       {"us-east-1": "https://kms.sim.internal:4566"}])
def test_refuses_without_an_http_endpoint(endpoints: dict[str, str] | None) -> None:
    with pytest.raises(InvalidInput) as e:
        sim_kms_target(manifest(endpoints))
    diag = e.value.diagnostics[0]
    assert diag.field in ("kms_proxy", "kms_proxy.endpoints")
    assert "http://" in diag.fix


def test_commands(tmp_path: Path) -> None:
    argv = kms_command(tmp_path / "s", tmp_path / "root.pem", "us-east-1", {"AKIDP": ("sec", "arn:p")})
    assert argv[argv.index("--port") + 1] == "0"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--attestation-root") + 1] == str(tmp_path / "root.pem")
    assert "--no-aws-root" in argv and "AKIDP:sec=arn:p" in argv
    imds = imds_command(("AKIDP", "sec"), "us-east-1")
    assert imds[imds.index("--role") + 1] == SIM_PARENT_ROLE
    assert "AKIDP:sec" in imds and "--json" in imds and imds[imds.index("--port") + 1] == "0"


def test_egress_must_allow_the_mapped_hosts() -> None:
    class Policy:
        def __init__(self, allowed: set[str]) -> None:
            self.allowed = allowed

        def decide(self, dest: Any) -> Any:
            return SimpleNamespace(allowed=dest.host in self.allowed)

    m = SimpleNamespace(egress=SimpleNamespace(enabled=True, policy=lambda: Policy({IMDS_ADDRESS})))
    ports = {IMDS_ADDRESS: 80, "kms.sim.internal": 4566}
    with pytest.raises(InvalidInput, match=r"kms\.sim\.internal:4566"):
        check_sim_service_egress(m, dict.fromkeys(ports, ("", 0)), ports)
    m.egress.policy = lambda: Policy(set(ports))
    check_sim_service_egress(m, dict.fromkeys(ports, ("", 0)), ports)
    m.egress.enabled = False
    with pytest.raises(InvalidInput, match="egress is off"):
        check_sim_service_egress(m, dict.fromkeys(ports, ("", 0)), ports)


def test_real_children(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from enclaver_rules.runtime.sim_nsm import CertificateAuthority

    ca = CertificateAuthority.open(tmp_path / "ca")
    state = tmp_path / "kms"
    services = start_sim_services(kms_state=state, imds=True, ca_root=ca.root_path,
                                  manifest=manifest({"us-east-1": "http://kms.sim.internal:4566"}), log_dir=state)
    try:
        assert services.kms_endpoint and services.imds_endpoint and services.admin_akid and services.credentials
        assert services.imds == f"http://{IMDS_ADDRESS}"
        assert services.static_hosts["kms.sim.internal"][0] == "127.0.0.1"
        assert services.static_hosts[IMDS_ADDRESS] == ("127.0.0.1", int(services.imds_endpoint.rsplit(":", 1)[1]))
        assert stat.S_IMODE(services.credentials.stat().st_mode) == 0o600
        secret = services.credentials.read_text().split("aws_secret_access_key = ")[1].split("\n")[0]
        assert secret not in "\n".join(services.notes())
        # the IMDS serves the parent's credentials (IMDSv2)
        token = urllib.request.urlopen(urllib.request.Request(
            f"{services.imds_endpoint}/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}), timeout=10).read().decode()
        base = f"{services.imds_endpoint}/latest/meta-data/iam/security-credentials/"
        role = urllib.request.urlopen(urllib.request.Request(
            base, headers={"X-aws-ec2-metadata-token": token}), timeout=10).read().decode().strip()
        assert role == SIM_PARENT_ROLE
        creds = json.loads(urllib.request.urlopen(urllib.request.Request(
            base + role, headers={"X-aws-ec2-metadata-token": token}), timeout=10).read())
        # the KMS accepts both: the admin creates a key, the parent (IMDS's credentials) is known to it
        cfg = Config(retries={"max_attempts": 1})
        admin = boto3.client("kms", endpoint_url=services.kms_endpoint, region_name="us-east-1",
                             aws_access_key_id=services.admin_akid, aws_secret_access_key=secret, config=cfg)
        key = admin.create_key()["KeyMetadata"]["KeyId"]
        parent = boto3.client("kms", endpoint_url=services.kms_endpoint, region_name="us-east-1",
                              aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                              aws_session_token=creds["Token"], config=cfg)
        assert any(k["KeyId"] == key for k in parent.list_keys()["Keys"])
    finally:
        services.stop()
    assert all(p.poll() is not None for p in services.processes)
    assert all(p.returncode == 0 for p in services.processes), [p.read_text() for p in services.logs]


def test_host_egress_maps_an_ip_literal(tmp_path: Path) -> None:
    """--sim-imds maps 169.254.169.254 (an IP literal) after it passed the IP rules; unmapped IPs are unchanged."""
    import asyncio

    from enclaver_rules.link.transport import UnixTransport
    from enclaver_rules.policy import EgressPolicy
    from enclaver_rules.runtime.egress_host import HostEgress

    egress = HostEgress(EgressPolicy.from_lists([IMDS_ADDRESS, "10.0.0.1"]), UnixTransport(tmp_path, 2),
                        static_hosts={IMDS_ADDRESS: ("127.0.0.1", 4242)})
    assert asyncio.run(egress.vet(IMDS_ADDRESS, 80)) == (["127.0.0.1"], "")
    assert asyncio.run(egress.vet("10.0.0.1", 80)) == (["10.0.0.1"], "")
    assert asyncio.run(egress.vet("10.0.0.2", 80))[0] == []


def test_debug_mode_warns_that_pinned_key_policies_refuse_it() -> None:
    """`enclaver run --debug-mode` says up front why KMS will refuse (KMS's own AccessDenied never does)."""
    pcrs = {"PCR0": "c1eb03a5b429da6d" + "0" * 80}
    with_kms = debug_mode_warning(manifest({"us-east-1": "http://kms.sim.internal:4566"}), pcrs)
    assert with_kms.startswith("warning: --debug-mode: the enclave's attestation documents carry all-zero PCR0")
    assert "not this build's (PCR0 c1eb03a5b429da6d…)" in with_kms
    assert "a KMS key policy that pins its PCRs (as `enclaver trust --kms-policy` writes) refuses" in with_kms
    without = debug_mode_warning(manifest(None), pcrs)
    assert "KMS" not in without and "any verifier expecting its measurements refuses it" in without
