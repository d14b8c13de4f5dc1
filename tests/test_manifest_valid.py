"""Manifests that must load: our examples, upstream's manifests as published, and warning-only cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from conftest import EXAMPLES
from conftest import HEAD_VALID as HEAD
from enclaver_rules.manifest import KmsEndpoint, Manifest, check_file, load_manifest
from enclaver_rules.manifest.model import DEFAULT_CPU_COUNT, DEFAULT_MEMORY_MB
from enclaver_rules.manifest.schema import fields, schema

REPO = Path(__file__).resolve().parent.parent

# upstream's guides and issue tracker (../shared/seeds), verbatim apart from placeholders
UPSTREAM = {
    "no-fly-list guide": """version: v1
name: "test"
target: "no-fly-list:enclave-latest"
sources:
  app: "registry.edgebit.io/no-fly-list:latest"
defaults:
  memory_mb: 4096
kms_proxy:
  listen_port: 9999
egress:
  allow:
    - kms.*.amazonaws.com
    - s3.amazonaws.com
    - 169.254.169.254
ingress:
  - listen_port: 8001
""",
    "vault guide": """version: v1
name: "enclaver-vault"
sources:
  app: "vault:enclave-src"
target: "vault:enclave"
ingress:
  - listen_port: 8200
egress:
  allow:
    - 169.254.169.254
    - kms.*.amazonaws.com
    - host
kms_proxy:
  listen_port: 9999
defaults:
  memory_mb: 3000
""",
    "vault cluster issue": """# https://edgebit.io/enclaver/docs/0.x/manifest/
version: v1
name: "enclaver-vault"

sources:
  # Name and tag of the Docker container that contains the application code
  app: "vault-src:latest"

# Name and tag of the Docker container outputted from the build process
target: "vault:enclave"

ingress:
  # Vault listens on both 8200 (API) and 8201 (node-to-node communication)
  - listen_port: 8200
  - listen_port: 8201

egress:
  allow:
    # IMDS
    - 169.254.169.254
    # EC2 APIs for auto-join discovery
    - ec2.*.amazonaws.com
    # VPC CIDR
    - 10.1.0.0/16
    # EC2 host (I don't think we need this one)
    - host

kms_proxy:
  listen_port: 9999

defaults:
  memory_mb: 2000
""",
}


def test_schema_is_valid_2020_12() -> None:
    Draft202012Validator.check_schema(schema())
    assert schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_model_defaults_equal_schema_defaults() -> None:
    by_key = {f.key: f for f in fields()}
    assert by_key["defaults.cpu_count"].default == DEFAULT_CPU_COUNT
    assert by_key["defaults.memory_mb"].default == DEFAULT_MEMORY_MB


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_examples_are_valid_without_warnings(path: Path) -> None:
    result = check_file(str(path))
    assert result.diagnostics == ()


def test_there_are_the_three_examples() -> None:
    assert {p.parent.name for p in EXAMPLES} >= {"hello", "no-fly-list", "vault"}


def test_no_fly_list_example_matches_the_guide() -> None:
    m, _ = load_manifest(str(REPO / "examples/no-fly-list/enclaver.yaml"))
    assert m.kms_proxy is not None and m.kms_proxy.listen_port == 9999
    assert set(m.egress.allow) == {"kms.*.amazonaws.com", "s3.amazonaws.com", "169.254.169.254"}
    assert [i.listen_port for i in m.ingress] == [8001] and m.defaults.memory_mb == 4096


def test_vault_example_matches_the_guide() -> None:
    m, _ = load_manifest(str(REPO / "examples/vault/enclaver.yaml"))
    assert [i.listen_port for i in m.ingress] == [8200, 8201]
    assert m.kms_proxy is not None
    policy = m.egress.policy()
    for dest in ("host", "10.1.7.7:8201", "vault-2.vault.internal:8201", "kms.us-east-1.amazonaws.com",
                 "169.254.169.254"):
        assert policy.decide(dest).allowed, dest


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_upstream_manifests_load_as_published(name: str, tmp_path: Path) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text(UPSTREAM[name])
    result = check_file(str(path))
    assert [d for d in result.diagnostics if d.severity == "error"] == []


def test_old_source_names_are_accepted_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text(HEAD + "  supervisor: registry.edgebit.io/odyn:v0.5\n  wrapper: registry.edgebit.io/wrapper:v0.5\n")
    manifest, warnings = load_manifest(str(path))
    assert manifest.sources.odyn == "registry.edgebit.io/odyn:v0.5"
    assert manifest.sources.sleeve == "registry.edgebit.io/wrapper:v0.5"
    assert [str(w).replace(str(path), "F") for w in warnings] == [
        "F:6:3: warning: sources.supervisor: `supervisor` is the old name of `odyn` (upstream 0.5) — rename it to `odyn`",
        "F:7:3: warning: sources.wrapper: `wrapper` is the old name of `sleeve` (upstream 0.5) — rename it to `sleeve`",
    ]


WARNINGS = {
    "odd CPU count": ("defaults:\n  cpu_count: 3\n", "defaults.cpu_count", "use an even count"),
    "allow everything": ("egress:\n  allow: ['**']\n", "egress.allow[0]", "'**' allows every host name"),
    "every address": ("egress:\n  allow: [0.0.0.0/0]\n", "egress.allow[0]", "allows every IPv4 address"),
    "host bits": ("egress:\n  allow: [10.1.2.3/16]\n", "egress.allow[0]", "it means 10.1.0.0/16"),
    "repeated rule": ("egress:\n  allow: [a.com, A.com.]\n", "egress.allow[1]", "repeats entry [0]"),
    "deny without allow": ("egress:\n  deny: [a.com]\n", "egress.deny", "`deny` has no effect without `allow`"),
    "proxy port without allow": ("egress:\n  proxy_port: 9000\n", "egress.proxy_port", "no proxy runs"),
    "no KMS endpoint allowed": ("kms_proxy: {listen_port: 9999}\negress:\n  allow: [169.254.169.254]\n", "kms_proxy",
                                "egress allows no KMS endpoint"),
    "KMS over plain HTTP": ("kms_proxy:\n  listen_port: 9999\n  endpoints: {us-east-1: 'http://127.0.0.1:4599'}\n"
                            "egress:\n  allow: [169.254.169.254, 127.0.0.1]\n", "kms_proxy.endpoints.us-east-1",
                            "plain HTTP: the KMS proxy's signed requests and KMS's answers"),
}


@pytest.mark.parametrize("case", list(WARNINGS))
def test_warnings_do_not_invalidate(case: str, tmp_path: Path) -> None:
    text, field, phrase = WARNINGS[case]
    path = tmp_path / "enclaver.yaml"
    path.write_text(HEAD + text)
    result = check_file(str(path))
    assert result.valid
    assert [(d.severity, d.field) for d in result.diagnostics] == [("warning", field)]
    assert phrase in str(result.diagnostics[0])


def test_regional_kms_endpoint_counts_as_allowed(tmp_path: Path) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text(HEAD + "kms_proxy: {listen_port: 9999}\negress:\n  allow: [169.254.169.254, kms.eu-west-1.amazonaws.com]\n")
    assert check_file(str(path)).diagnostics == ()


def test_kms_endpoints_parse_to_scheme_host_and_port(tmp_path: Path) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text(HEAD + "kms_proxy:\n  listen_port: 9999\n  endpoints:\n    us-east-1: http://127.0.0.1:4599\n"
                           "    eu-west-1: https://kms-fips.eu-west-1.amazonaws.com\n    us-west-2: vpce.example.com:8443\n"
                           "egress:\n  allow: [169.254.169.254, 127.0.0.1, kms-fips.eu-west-1.amazonaws.com, vpce.example.com]\n")
    manifest, _ = load_manifest(str(path))
    assert manifest.kms_proxy is not None
    local = manifest.kms_proxy.endpoint("us-east-1")
    assert (local.host, local.port, local.tls, local.url, str(local)) == (
        "127.0.0.1", 4599, False, "http://127.0.0.1:4599/", "http://127.0.0.1:4599")
    fips = manifest.kms_proxy.endpoint("eu-west-1")
    assert (fips.host, fips.port, fips.tls, fips.url) == ("kms-fips.eu-west-1.amazonaws.com", 443, True,
                                                          "https://kms-fips.eu-west-1.amazonaws.com/")
    assert manifest.kms_proxy.endpoint("us-west-2").authority == "vpce.example.com:8443"
    assert manifest.kms_proxy.endpoint("ap-south-1").url == "https://kms.ap-south-1.amazonaws.com/"
    assert manifest.kms_proxy.endpoint("cn-north-1").host == "kms.cn-north-1.amazonaws.com.cn"
    assert KmsEndpoint.parse("http://kms.test").port == 80
    for bad in ("ftp://kms.test", "kms.test:0", "kms.test:65536", "http://", "kms.test/path"):
        with pytest.raises(ValueError, match="KMS endpoint"):
            KmsEndpoint.parse(bad)


def test_model_keeps_the_file_bytes_exactly(tmp_path: Path) -> None:
    path = tmp_path / "enclaver.yaml"
    raw = (HEAD + "# comment kept\r\n").encode()
    path.write_bytes(raw)
    manifest, _ = load_manifest(str(path))
    assert manifest.raw == raw
    assert manifest == Manifest.from_data(json.loads(json.dumps({
        "version": "v1", "name": "app", "target": "registry.example.com/app:enclave",
        "sources": {"app": "registry.example.com/app:1.0"}})), path=str(path), raw=raw)


def test_stdin_is_read_for_dash(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(HEAD.encode())))
    result = cli("manifest", "check", "-")
    assert result.code == 0 and result.lines == ["-: valid — app"]
