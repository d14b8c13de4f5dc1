"""The rule set with the nitro-cli backend (`enclaver build --backend nitro-cli`), through a real
Docker engine and a stand-in nitro-cli image: the real one is on public.ecr.aws, off this network.

The stand-in answers `build-enclave` by writing a real EIF baked into it (built beforehand with the
pure backend) and printing PCRs: the ones of that EIF, or, in the lying variant, others. The rule set
must take the EIF from the container, check the printed PCRs against the EIF's own, and key the
build on the nitro-cli image's ID.
"""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest

from oci_helpers import import_standin
from pipeline import doit, summary

pytestmark = pytest.mark.services

SCRIPT = """#!/bin/sh
[ "$1" = build-enclave ] || exit 2
while [ $# -gt 0 ]; do case "$1" in --output-file) out=$2; shift 2 ;; *) shift ;; esac; done
[ -S /var/run/docker.sock ] || { echo "the engine socket is not mounted" >&2; exit 3; }
cp /standin/application.eif "$out"
cat /standin/measurements.json
"""


@pytest.fixture
def standins(dockerd, monorepo: Path) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Stand-ins that hand out gamma's EIF: one honest about its PCRs, one not."""
    assert doit(monorepo, "build:gamma").returncode == 0
    latest = monorepo / "cache" / "out" / "gamma" / "latest"
    eif = (latest / "application.eif").read_bytes()
    honest = (latest / "measurements.json").read_bytes()
    lying = json.loads(honest)
    lying["Measurements"]["PCR2"] = "ab" * 48
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        names = {variant: import_standin(client, f"enclaver-test/nitro-cli-rules:{variant}", SCRIPT.encode(),
                                         {"standin/application.eif": eif, "standin/measurements.json": printed})
                 for variant, printed in (("honest", honest), ("lying", json.dumps(lying).encode()))}
    finally:
        client.close()
    return {"names": names, "pcrs": summary(monorepo, "gamma")["measurements"], "eif": eif}


def test_the_nitro_cli_backend_builds_through_the_rule_set(monorepo: Path, dockerd, standins, cli) -> None:  # type: ignore[no-untyped-def]
    env = {"DOCKER_HOST": dockerd.host, "ENC_BUILD_BACKEND": "nitro-cli",
           "ENC_BUILD_NITRO_CLI_IMAGE": standins["names"]["honest"]}
    result = doit(monorepo, "build:alpha", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    built = summary(monorepo, "alpha")
    assert built["measurements"] == standins["pcrs"]  # the container's EIF, measured
    latest = monorepo / "cache" / "out" / "alpha" / "latest"
    assert (latest / "application.eif").read_bytes() == standins["eif"]
    resolved = json.loads((monorepo / "cache" / "out" / "alpha" / "resolved.json").read_text())
    assert resolved["settings"]["nitro_cli"]["id"].startswith("sha256:")

    pure = doit(monorepo, "build:alpha")  # the backend is part of the key: back to pure is another build
    assert pure.returncode == 0 and summary(monorepo, "alpha")["key"] != built["key"]
    assert summary(monorepo, "alpha")["measurements"] != built["measurements"]

    lying = doit(monorepo, "build:alpha", env={**env, "ENC_BUILD_NITRO_CLI_IMAGE": standins["names"]["lying"]})
    assert lying.returncode != 0
    assert "nitro-cli printed PCRs" in lying.stdout + lying.stderr and "but its EIF measures" in lying.stdout + lying.stderr

    missing = doit(monorepo, "build:alpha", env={**env, "ENC_BUILD_NITRO_CLI_IMAGE": "enclaver-test/absent:1"})
    assert missing.returncode != 0 and "docker pull enclaver-test/absent:1" in missing.stdout + missing.stderr


def test_enclaver_build_takes_the_backend_flag(monorepo: Path, dockerd, standins, cli,  # type: ignore[no-untyped-def]
                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    manifest = monorepo / "services" / "beta" / "enclaver.yaml"
    manifest.write_text(manifest.read_text().replace("build:\n", f"build:\n  nitro_cli_image: {standins['names']['honest']}\n"))
    result = cli("build", "-f", str(manifest), "--cache-dir", str(monorepo / "cache"), "--backend", "nitro-cli",
                 "--eif-only", str(tmp_path / "beta.eif"), "--json")
    assert result.code == 0, result.stderr
    assert result.json()["Measurements"] == standins["pcrs"]
    assert (tmp_path / "beta.eif").read_bytes() == standins["eif"]
