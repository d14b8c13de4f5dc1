"""The loop closed, every piece a real process as in the simulator: an EIF is built, `enclaver trust
--kms-policy` writes its key policy, the local KMS (`enclaver kms serve`) holds a key under it, the
local IMDS (`enclaver imds serve`) hands the parent role's credentials out, the simulated NSM
(`enclaver attestation sim-nsm`) boots with the EIF's PCRs, and odyn runs an unchanged boto3 app
whose KMS calls go through odyn's KMS proxy and egress. The measured enclave gets its data key;
another build's PCR0, a debug-mode enclave, a document from a CA the KMS does not trust and a call
without attestation are refused; and the policy's hardening stops grants and re-encryption."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from conftest import Result
from enclaver_rules.cli.main import main
from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.policy import EgressPolicy
from enclaver_rules.ports import LOGS_PORT
from enclaver_rules.runtime.egress_host import HostEgress
from imds_helpers import running_imds
from kms_helpers import ACCOUNT, ADMIN, IDENTITIES, PARENT, RunningKms, local_kms
from services import free_port
from sim_helpers import built_measurements, sim_nsm

#: The enclave's app: plain boto3 with dummy credentials and no endpoint_url (odyn sets
#: AWS_ENDPOINT_URL_KMS); it writes what happened to argv[2] and exits 3 when KMS refused.
APP = r"""
import sys, boto3
from botocore.config import Config
from botocore.exceptions import ClientError
kms = boto3.client("kms", config=Config(retries={"total_max_attempts": 1}))
key, out = sys.argv[1], sys.argv[2]
try:
    made = kms.generate_data_key(KeyId=key, KeySpec="AES_256")
    again = kms.decrypt(CiphertextBlob=made["CiphertextBlob"], KeyId=key)
except ClientError as e:
    open(out, "w").write(f"refused {e.response['Error']['Code']}: {e.response['Error'].get('Message', '')}")
    sys.exit(3)
assert "Plaintext" in made and again["Plaintext"] == made["Plaintext"] and len(made["Plaintext"]) == 32
import base64
open(out, "w").write(f"decrypted {len(again['Plaintext'])} bytes {base64.b64encode(made['CiphertextBlob']).decode()}")
"""
APP_ENV = {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "AKIDAPPDUMMY", "AWS_SECRET_ACCESS_KEY": "app-dummy",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
PARENT_KEY = next(k for k, (_, arn) in IDENTITIES.items() if arn == PARENT)


def _cli(*args: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), stdout=out, stderr=err)
    return Result(code, out.getvalue(), err.getvalue())


@dataclass
class World:
    root: Path
    measurements: Path  # the enclave's
    rebuilt: Path  # the same app with one byte changed: another PCR0
    trusted_ca: Path  # the simulator CA the KMS trusts
    kms: RunningKms
    imds_url: str
    key_id: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("loop")
    env = {k: v for k, v in os.environ.items() if k.startswith("ENC_")}
    for name in env:
        del os.environ[name]
    try:
        measurements = built_measurements(_cli, root / "eif", b"the app, release 1")
        rebuilt = built_measurements(_cli, root / "eif2", b"the app, release 2")
        policy = _cli("trust", str(measurements), "--kms-policy", "--account", ACCOUNT, "--admin", ADMIN,
                      "--principal", PARENT)
        assert policy.code == 0, policy.stderr
        made = _cli("attestation", "ca", "--state", str(root / "ca"), "--json")
        assert made.code == 0, made.stderr
    finally:
        os.environ.update(env)
    with local_kms(root / "kms", roots=[root / "ca" / "root.pem"], aws_root=False) as kms, \
            running_imds(access_key_id=PARENT_KEY, secret_access_key=IDENTITIES[PARENT_KEY][0]) as imds:
        key_id = kms.client("AKIDADMIN").create_key(Policy=policy.stdout)["KeyMetadata"]["KeyId"]
        yield World(root, measurements, rebuilt, root / "ca", kms, imds.url, key_id)


async def _read_logs(vsock: Path) -> bytes:
    """odyn's log stream (its own lines and the app's output), as the host side reads it."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            reader, writer = await UnixTransport(vsock, 2).connect(16, LOGS_PORT)
            break
        except (ConnectionRefusedError, FileNotFoundError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
    try:
        return await reader.read()
    finally:
        writer.close()


def _enclave(world: World, where: Path, measurements: Path, ca: Path, *nsm_flags: str) -> tuple[int, str]:
    """odyn as its own process, as in an enclave: NSM from sim-nsm, credentials from the local IMDS,
    KMS and IMDS reached only through egress, whose host side the test runs."""
    where.mkdir()
    (where / "vsock").mkdir()
    egress_port, proxy_port = free_port(), free_port()
    (where / "cfg").mkdir()
    (where / "cfg" / "enclaver.yaml").write_text(
        "version: v1\nname: app\ntarget: t\nsources: {app: a}\n"
        f"egress:\n  proxy_port: {egress_port}\n  allow: [169.254.169.254, 127.0.0.1]\n"
        f"kms_proxy:\n  listen_port: {proxy_port}\n  endpoints:\n    us-east-1: {world.kms.endpoint}\n")
    out = where / "app.out"

    async def run(socket: str) -> int:
        host = await HostEgress(EgressPolicy.from_lists(["127.0.0.1"], []), UnixTransport(where / "vsock", 2)).serve()
        try:
            odyn = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "odyn", "--transport", f"unix:{where / 'vsock'}", "--cid", "16",
                "--linger", "0.2", "--no-bootstrap", "--config-dir", str(where / "cfg"), "--nsm", f"unix:{socket}",
                "--imds", world.imds_url, "--", sys.executable, "-c", APP, world.key_id, str(out),
                env=APP_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            logs = asyncio.create_task(_read_logs(where / "vsock"))
            output, _ = await asyncio.wait_for(odyn.communicate(), 120)
            assert odyn.returncode is not None
            if not out.exists():
                log = (await asyncio.wait_for(logs, 30)).decode(errors="replace")
                raise AssertionError(f"the app wrote nothing (odyn exited {odyn.returncode}): {output.decode()}{log}")
            logs.cancel()
            return odyn.returncode
        finally:
            host.close()

    with sim_nsm(where / "nsm.sock", measurements, ca, *nsm_flags) as facts:
        code = asyncio.run(run(str(facts["socket"])))
    return code, out.read_text()


@pytest.fixture(scope="module")
def measured(world: World) -> tuple[int, str]:
    """The measured enclave's run: its exit code and what the app said."""
    return _enclave(world, world.root / "measured", world.measurements, world.trusted_ca)


def test_the_measured_enclave_gets_its_data_key(measured: tuple[int, str]) -> None:
    code, said = measured
    assert code == 0 and said.startswith("decrypted 32 bytes "), said


@pytest.mark.parametrize(("case", "expected"), [
    ("another build's PCR0", "refused AccessDeniedException"),
    ("debug mode", "refused AccessDeniedException"),
    ("a CA the KMS does not trust", "refused ValidationException"),
])
def test_other_enclaves_are_refused(world: World, tmp_path: Path, case: str, expected: str) -> None:
    measurements, ca, flags = {
        "another build's PCR0": (world.rebuilt, world.trusted_ca, ()),
        "debug mode": (world.measurements, world.trusted_ca, ("--debug-mode",)),
        "a CA the KMS does not trust": (world.measurements, tmp_path / "other-ca", ()),
    }[case]
    code, said = _enclave(world, tmp_path / "enclave", measurements, ca, *flags)
    assert code == 3 and said.startswith(expected), said


def _refused(call: Any, **params: Any) -> str:
    with pytest.raises(ClientError) as caught:
        call(**params)
    return str(caught.value.response["Error"]["Code"])


def test_without_attestation_nobody_gets_plaintext_and_the_hardening_holds(world: World,
                                                                          measured: tuple[int, str]) -> None:
    parent, admin = world.kms.client(PARENT_KEY), world.kms.client("AKIDADMIN")
    assert _refused(parent.generate_data_key, KeyId=world.key_id, KeySpec="AES_256") == "AccessDeniedException"
    assert _refused(admin.generate_data_key, KeyId=world.key_id, KeySpec="AES_256") == "AccessDeniedException"
    sealed = base64.b64decode(measured[1].rsplit(" ", 1)[1])  # the data key the measured enclave got
    assert _refused(parent.decrypt, CiphertextBlob=sealed, KeyId=world.key_id) == "AccessDeniedException"
    for client in (parent, admin):  # the grant and re-encrypt paths past the attestation condition
        assert _refused(client.create_grant, KeyId=world.key_id, GranteePrincipal=PARENT,
                        Operations=["Decrypt"]) == "AccessDeniedException"
        assert _refused(client.re_encrypt, CiphertextBlob=sealed, DestinationKeyId=world.key_id) \
            == "AccessDeniedException"
    policy = json.loads(admin.get_key_policy(KeyId=world.key_id, PolicyName="default")["Policy"])
    assert any(s.get("Effect") == "Deny" for s in policy["Statement"])
