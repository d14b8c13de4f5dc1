"""Contract test of the nitro-cli backend, against a stand-in image with nitro-cli's command line.

The stand-in (busybox-static plus a shell script as `nitro-cli`, entrypoint and WORKDIR as in
the real image) checks the exact arguments and the mounted engine socket, writes an EIF to the
output file and prints `{"Measurements": ...}` as `nitro-cli build-enclave` does. Variants fail
the ways the backend must report: a full disk, unusable output, no EIF written.
"""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest

from enclaver_rules.eif import nitro_cli
from enclaver_rules.errors import OperationFailed
from oci_helpers import import_standin

pytestmark = pytest.mark.services
PCR = {"PCR0": "a" * 96, "PCR1": "b" * 96, "PCR2": "c" * 96}
GOOD_JSON = json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", **PCR}}, indent=2)  # serde's pretty form
SCRIPT = r"""#!/bin/sh
# stand-in for `nitro-cli build-enclave` (aws-nitro-enclaves-cli): same arguments, same outputs
[ "$1" = build-enclave ] || { echo "unknown command: $1" >&2; exit 2; }
shift
while [ $# -gt 0 ]; do
  case "$1" in
    --docker-uri) uri=$2; shift 2 ;;
    --output-file) out=$2; shift 2 ;;
    --signing-certificate) cert=$2; shift 2 ;;
    --private-key) key=$2; shift 2 ;;
    *) echo "unexpected argument: $1" >&2; exit 2 ;;
  esac
done
[ -S /var/run/docker.sock ] || { echo "the engine socket is not mounted" >&2; exit 3; }
[ "$(pwd)" = /build ] || { echo "WORKDIR is not /build" >&2; exit 3; }
[ -z "$cert" ] || { [ -r "$cert" ] && [ -r "$key" ]; } || { echo "signing files not mounted" >&2; exit 4; }
echo "Start building the Enclave Image..." >&2
echo "Using the locally available Docker image..." >&2
MODE
printf 'EIF built from %s signed=%s\n' "$uri" "${cert:+yes}" > "$out"
echo "Enclave Image successfully created." >&2
cat <<'JSON'
OUTPUT
JSON
"""
VARIANTS = {
    "ok": ("", GOOD_JSON),
    "disk-full": ('echo "Linuxkit reported an error: write /tmp/x: no space left on device" >&2; exit 1', GOOD_JSON),
    "garbage": ("", "this is not json"),
    "no-eif": ('echo "Enclave Image successfully created." >&2; echo \'' + GOOD_JSON.replace("\n", " ")
               + "'; exit 0", GOOD_JSON),
}


@pytest.fixture(scope="module")
def standins(dockerd) -> dict[str, str]:  # type: ignore[no-untyped-def]
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    names = {}
    try:
        for variant, (mode, output) in VARIANTS.items():
            script = SCRIPT.replace("MODE", mode).replace("OUTPUT", output).encode()
            names[variant] = import_standin(client, f"enclaver-test/nitro-cli-standin:{variant}", script)
    finally:
        client.close()
    return names


@pytest.fixture
def app_image(cli, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout

    make_layout(str(tmp_path / "layout"), "v", [[Entry.file("bin/app", b"app", 0o755)]], cmd=("/bin/app",))
    return f"oci:{tmp_path / 'layout'}:v"


def build(cli, app_image: str, standin: str, tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return cli("eif", "build", "--backend", "nitro-cli", "--nitro-cli-image", standin, "--image", app_image,
               "-o", str(tmp_path / "app.eif"), "--cache-dir", str(tmp_path / "cache"), "--json", *extra)


def test_contract_arguments_mounts_output(cli, dockerd, standins, app_image, tmp_path: Path,  # type: ignore[no-untyped-def]
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    result = build(cli, app_image, standins["ok"], tmp_path)
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["backend"] == "nitro-cli"
    assert {k: doc["Measurements"][k] for k in PCR} == PCR and doc["Measurements"]["HashAlgorithm"] == "Sha384 { ... }"
    written = (tmp_path / "app.eif").read_text()
    assert written.startswith("EIF built from enclaver-build/") and "signed=\n" in written
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        tags = [t for i in client.images.list() for t in i.tags]
        assert not any(t.startswith("enclaver-build/") for t in tags)  # the build tag is cleaned up
        assert not client.containers.list(all=True, filters={"ancestor": standins["ok"]})  # and the container
    finally:
        client.close()


def test_contract_signing_files_are_mounted(cli, dockerd, standins, app_image, tmp_path: Path,  # type: ignore[no-untyped-def]
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from test_eif import _signing_material

    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    cert, key, _ = _signing_material(tmp_path)
    result = build(cli, app_image, standins["ok"], tmp_path, "--signing-certificate", str(cert),
                   "--signing-key", str(key))
    assert result.code == 0, result.stderr
    assert "signed=yes" in (tmp_path / "app.eif").read_text()


@pytest.mark.parametrize("variant, message, fix", [
    ("disk-full", "nitro-cli exited with code 1", "disk is full"),
    ("garbage", "printed no usable measurements", "build-enclave"),
    ("no-eif", "wrote no /build/application.eif", "version"),
])
def test_contract_failures_are_reported(cli, dockerd, standins, app_image, tmp_path: Path,  # type: ignore[no-untyped-def]
                                        monkeypatch: pytest.MonkeyPatch, variant: str, message: str, fix: str) -> None:
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    result = build(cli, app_image, standins[variant], tmp_path)
    assert result.code == 1
    assert message in result.stderr and fix in result.stderr
    assert not (tmp_path / "app.eif").exists()


def test_missing_nitro_cli_image(cli, dockerd, app_image, tmp_path: Path,  # type: ignore[no-untyped-def]
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    result = build(cli, app_image, "enclaver-test/no-such-nitro-cli:1", tmp_path)
    assert result.code == 1 and "is not in the engine" in result.stderr


def test_output_parsing_and_diagnosis_units() -> None:
    assert nitro_cli.parse_output(GOOD_JSON).pcr0 == "a" * 96
    with pytest.raises(OperationFailed):
        nitro_cli.parse_output('{"Measurements": {"PCR0": "short"}}')
    assert "memory" in nitro_cli.diagnose(["...", "rootfs/cmd", "env"])
    assert nitro_cli.arguments("t:1", True)[-4:] == ["--signing-certificate", "/var/run/certificate",
                                                     "--private-key", "/var/run/key"]
