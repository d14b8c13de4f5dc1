"""Broken manifests, each with the exact messages `enclaver manifest check` must print.

Positions are worked out by hand from the YAML text (1-based line:column of the value, or of the
key for unknown/missing keys). Every line names the file, the position, the field and a fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaver_rules.manifest import check_file

HEAD = 'version: v1\nname: app\ntarget: "registry.example.com/app:enclave"\nsources:\n  app: "registry.example.com/app:1.0"\n'
# lines 1-5 above; each case's extra text starts at line 6

F = "enclaver.yaml"
CASES: dict[str, tuple[str, list[str]]] = {
    "typo at top level": (HEAD + "ingres:\n  - listen_port: 80\n", [
        f"{F}:6:1: ingres: unknown key 'ingres' — did you mean 'ingress'?"]),
    "key under the wrong parent": (HEAD + "memory_mb: 512\n", [
        f"{F}:6:1: memory_mb: unknown key 'memory_mb' — did you mean `defaults.memory_mb`? move it under `defaults:`"]),
    "typo in a list item": (HEAD + "ingress:\n  - lisen_port: 8001\n", [
        f"{F}:7:5: ingress[0]: missing required key `listen_port` — add `listen_port: 8001` under `ingress[0]:`",
        f"{F}:7:5: ingress[0].lisen_port: unknown key 'lisen_port' — did you mean 'listen_port'?"]),
    "unknown key, nothing close": (HEAD + "defaults:\n  gpu: 1\n", [
        f"{F}:7:3: defaults.gpu: unknown key 'gpu' — remove it; allowed here: cpu_count, memory_mb"]),
    "upstream's early image key": (HEAD + "image: foo:1\n", [
        f"{F}:6:1: image: unknown key 'image' — the app image is `sources.app` (and the output tag `target`); "
        "upstream's early `image:` key is not part of v1"]),
    "unsupported version": (HEAD.replace("version: v1", "version: v2"), [
        f"{F}:1:10: version: 'v2' is not supported — write `version: v1`"]),
    "version as a number": (HEAD.replace("version: v1", "version: 1"), [
        f"{F}:1:10: version: 1 is not supported — write `version: v1`"]),
    "missing sources": ('version: v1\nname: app\ntarget: t\n', [
        f"{F}:1:1: missing required key `sources` — add `sources:` with app: registry.example.com/my-app:1.0"]),
    "missing app": ('version: v1\nname: app\ntarget: t\nsources:\n  odyn: o:1\n', [
        f"{F}:4:1: sources: missing required key `app` — add `app: registry.example.com/my-app:1.0` under `sources:`"]),
    "empty app": (HEAD.replace('app: "registry.example.com/app:1.0"', 'app: ""'), [
        f"{F}:5:8: sources.app: must not be empty — give an image reference such as "
        "`registry.example.com/app:1.0` or `app@sha256:<digest>`"]),
    "name with a space": (HEAD.replace("name: app", 'name: "my app"'), [
        f"{F}:2:7: name: 'my app' is not valid here — use letters, digits, '.', '_' and '-', starting with a "
        "letter or digit, e.g. `name: no-fly-list`"]),
    "quoted port": (HEAD + 'ingress:\n  - listen_port: "8001"\n', [
        f"{F}:7:18: ingress[0].listen_port: expected a whole number, got text '8001' — remove the quotes: 8001"]),
    "port above 65535": (HEAD + "api:\n  listen_port: 70000\n", [
        f"{F}:7:16: api.listen_port: 70000 is more than the maximum 65535 — use a TCP port from 1 to 65535, without quotes"]),
    "port 0": (HEAD + "api:\n  listen_port: 0\n", [
        f"{F}:7:16: api.listen_port: 0 is less than the minimum 1 — use a TCP port from 1 to 65535, without quotes"]),
    "api without a port": (HEAD + "api: {}\n", [
        f"{F}:6:1: api: missing required key `listen_port` — add `listen_port: 9000` under `api:`"]),
    "the same ingress port twice": (HEAD + "ingress:\n  - listen_port: 8001\n  - listen_port: 8001\n", [
        f"{F}:8:18: ingress[1].listen_port: port 8001 is already used by ingress[0].listen_port (line 7) — "
        "give every listener in the enclave its own port"]),
    "ingress and api on one port": (HEAD + "ingress:\n  - listen_port: 9000\napi:\n  listen_port: 9000\n", [
        f"{F}:9:16: api.listen_port: port 9000 is already used by ingress[0].listen_port (line 7) — "
        "give every listener in the enclave its own port"]),
    "ingress on an internal vsock port": (HEAD + "ingress:\n  - listen_port: 17000\n", [
        f"{F}:7:18: ingress[0].listen_port: port 17000 is enclaver's internal status vsock port — use a port outside 17000–17003"]),
    "ingress on the egress proxy's default port": (HEAD + "ingress:\n  - listen_port: 10000\negress:\n  allow: [example.com]\n", [
        f"{F}:7:18: ingress[0].listen_port: port 10000 is also the egress proxy's default port — "
        "set `egress.proxy_port` to another port, or move this listener"]),
    "memory below Nitro's minimum": (HEAD + "defaults:\n  memory_mb: 32\n", [
        f"{F}:7:14: defaults.memory_mb: 32 is less than the minimum 64 — give a whole number of MiB, at least 64 "
        "(the Nitro driver's minimum), e.g. `memory_mb: 4096`"]),
    "memory with a unit": (HEAD + "defaults:\n  memory_mb: 4G\n", [
        f"{F}:7:14: defaults.memory_mb: expected a whole number, got text '4G' — give a whole number of MiB, at least 64 "
        "(the Nitro driver's minimum), e.g. `memory_mb: 4096`"]),
    "no CPUs": (HEAD + "defaults:\n  cpu_count: 0\n", [
        f"{F}:7:14: defaults.cpu_count: 0 is less than the minimum 1 — give a whole number of vCPUs, at least 1, e.g. `cpu_count: 2`"]),
    "wildcard top-level label": (HEAD + 'egress:\n  allow:\n    - "*.*"\n', [
        f"{F}:8:7: egress.allow[0]: '*.*' is not a valid allow pattern: a wildcard top-level label matches every "
        "domain — name the domain, e.g. '**.example.com'"]),
    "partial wildcard": (HEAD + "egress:\n  allow:\n    - api-*.example.com\n", [
        f"{F}:8:7: egress.allow[0]: 'api-*.example.com' has a partial wildcard 'api-*': a wildcard must be a whole "
        "label — use '*' for exactly one label or '**' for one or more, e.g. '*.example.com'"]),
    "a port in a rule": (HEAD + "egress:\n  allow:\n    - example.com:443\n", [
        f"{F}:8:7: egress.allow[0]: 'example.com:443' names a port, but egress rules have no port component — "
        "write 'example.com': every port of an allowed host is allowed"]),
    "a URL in a rule": (HEAD + "egress:\n  deny:\n    - https://evil.example/\n  allow: [example.com]\n", [
        f"{F}:8:7: egress.deny[0]: 'https://evil.example/' is a URL, not a host — write the host only: 'evil.example'"]),
    "prefix too long": (HEAD + "egress:\n  allow:\n    - 10.0.0.0/33\n", [
        f"{F}:8:7: egress.allow[0]: '10.0.0.0/33': prefix length must be 0..32 — write e.g. 10.0.0.0/16"]),
    "host mask instead of netmask": (HEAD + "egress:\n  allow:\n    - 10.0.0.0/0.255.255.255\n", [
        f"{F}:8:7: egress.allow[0]: '10.0.0.0/0.255.255.255' has a mask that is not a contiguous netmask — write a "
        "prefix length, e.g. 10.0.0.0/8 (host masks like 0.255.255.255 are not accepted)"]),
    "IP with leading zeros": (HEAD + "egress:\n  allow:\n    - 010.0.0.1\n", [
        f"{F}:8:7: egress.allow[0]: '010.0.0.1' looks like an IP address but is not one in canonical form — write "
        "the address as four decimal octets without leading zeros, e.g. 10.0.0.1"]),
    "wildcards in an IP": (HEAD + "egress:\n  allow:\n    - 10.*.0.1\n", [
        f"{F}:8:7: egress.allow[0]: '10.*.0.1' puts wildcards in an IP address; wildcards apply to names only — "
        "write a CIDR network, e.g. 10.0.0.0/8"]),
    "an unquoted number as a rule": (HEAD + "egress:\n  allow:\n    - 10\n", [
        f"{F}:8:7: egress.allow[0]: expected text, got an integer 10 — quote the entry, e.g. `- \"10.0.0.1\"`"]),
    "allow as a string": (HEAD + "egress:\n  allow: example.com\n", [
        f"{F}:7:10: egress.allow: expected a list, got text 'example.com' — make it a list, e.g. `['example.com']` "
        "or one `- item` per line"]),
    "empty egress": (HEAD + "egress:\n", [
        f"{F}:6:1: egress: has no value — give a map, or remove the key"]),
    "KMS proxy without egress": (HEAD + "kms_proxy:\n  listen_port: 9999\n", [
        f"{F}:6:1: kms_proxy: the KMS proxy needs egress, but egress is off — add `egress.allow` entries for "
        "169.254.169.254 and kms.*.amazonaws.com"]),
    "KMS proxy without instance metadata": (HEAD + "kms_proxy:\n  listen_port: 9999\negress:\n  allow: [kms.*.amazonaws.com]\n", [
        f"{F}:6:1: kms_proxy: the KMS proxy gets its region and credentials from 169.254.169.254, which egress does "
        "not allow — add '169.254.169.254' to `egress.allow`"]),
    "KMS endpoint not allowed": (HEAD + "kms_proxy:\n  listen_port: 9999\n  endpoints:\n    us-east-1: vpce-1.kms.example.com\n"
                                 "egress:\n  allow: [169.254.169.254, kms.*.amazonaws.com]\n", [
        f"{F}:9:16: kms_proxy.endpoints.us-east-1: egress does not allow this endpoint (no allow rule matches "
        "(default deny)) — add 'vpce-1.kms.example.com' to `egress.allow`"]),
    "KMS endpoint port out of range": (HEAD + "kms_proxy:\n  listen_port: 9999\n  endpoints:\n    us-east-1: kms.example.com:70000\n"
                                       "egress:\n  allow: [169.254.169.254, kms.example.com]\n", [
        f"{F}:9:16: kms_proxy.endpoints.us-east-1: KMS endpoint 'kms.example.com:70000': port 70000 is not in "
        "1..65535 — give a port from 1 to 65535"]),
    "KMS endpoint with another scheme": (HEAD + "kms_proxy:\n  listen_port: 9999\n  endpoints:\n    us-east-1: ftp://kms.example.com\n"
                                         "egress:\n  allow: [169.254.169.254, kms.example.com]\n", [
        f"{F}:9:16: kms_proxy.endpoints.us-east-1: 'ftp://kms.example.com' is not valid here — give "
        "`host` or `host:port` (HTTPS), e.g. `kms-fips.us-east-1.amazonaws.com`; `http://host:port` only for a local "
        "KMS in tests"]),
    "KMS endpoint keyed by a non-region": (HEAD + "kms_proxy:\n  listen_port: 9999\n  endpoints:\n    useast1: kms.example.com\n"
                                           "egress:\n  allow: [169.254.169.254, kms.example.com]\n", [
        f"{F}:9:5: kms_proxy.endpoints.useast1: 'useast1' is not a valid key here — use an AWS region name as the key, "
        "e.g. `us-east-1`"]),
    "signature without a key": (HEAD + "signature:\n  certificate: cert.pem\n", [
        f"{F}:6:1: signature: missing required key `key` — add `key: signing/key.pem` under `signature:`",
        f"{F}:7:16: warning: signature.certificate: file 'cert.pem' not found (looked at {{dir}}/cert.pem) — the build "
        "needs it: create it, or fix the path (relative to the manifest)"]),
    "TLS without a certificate": (HEAD + "ingress:\n  - listen_port: 443\n    tls:\n      key_file: k.pem\n", [
        f"{F}:8:5: ingress[0].tls: missing required key `cert_file` — add `cert_file: /etc/enclaver/tls/cert.pem` "
        "under `ingress[0].tls:`"]),
    "odyn under both names": (HEAD + "  odyn: odyn:2\n  supervisor: odyn:1\n", [
        f"{F}:7:3: sources.supervisor: both `odyn` and its old name `supervisor` are set — keep only `odyn`"]),
    "spire block": (HEAD + "spire:\n  server_addr: https://spire:8081\n  ca_cert: /ca.pem\n  trust_domain: example.org\n"
                    "  svid_dir: /run/svid\n", [
        f"{F}:6:1: spire: SPIFFE/SPIRE identities are not supported by this enclaver yet — remove the `spire` block; "
        "the rest of the manifest is unaffected"]),
    "duplicate key": (HEAD + "name: other\n", [
        f"{F}:6:1: name: duplicate key (first set at line 2) — remove one of the two"]),
    "boolean key": (HEAD + "yes: 1\n", [
        f"{F}:6:1: key 'yes' is read as bool, not text — quote it: \"yes\"",
        f"{F}:6:1: yes: unknown key 'yes' — remove it; allowed at the top level: api, build, defaults, egress, ingress, "
        "kms_proxy, name, outputs, signature, sources, spire, target, version"]),
    "python tag": (HEAD + 'api: !!python/object/apply:os.system ["true"]\n', [
        f"{F}:6:1: api: has no value — give a map, or remove the key",
        f"{F}:6:6: api: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed in a manifest — "
        "remove the tag; write plain text, numbers, lists and maps"]),
    "explicit tag that does not fit": (HEAD + 'defaults:\n  memory_mb: !!int "12x"\n', [
        f"{F}:7:14: defaults.memory_mb: cannot read '12x' as int: invalid literal for int() with base 10: '12x' — "
        "remove the explicit tag, or fix the value",
        f"{F}:7:14: defaults.memory_mb: expected a whole number, got text '12x' — give a whole number of MiB, at least "
        "64 (the Nitro driver's minimum), e.g. `memory_mb: 4096`"]),
    "tab indentation": (HEAD + "defaults:\n\tmemory_mb: 512\n", [
        f"{F}:7:1: invalid YAML: found character '\\t' that cannot start any token — indent with spaces, not tabs"]),
    "two documents": (HEAD + "---\nversion: v1\n", [
        f"{F}:7:1: the file holds more than one YAML document — keep one manifest per file; remove the '---' separator"]),
    "empty file": ("", [
        f"{F}:1:1: the manifest is empty — start from an example in examples/, e.g. examples/hello/enclaver.yaml"]),
    "a list instead of a map": ("- version: v1\n", [
        f"{F}:1:1: the manifest must be a map of keys (`version: v1`, `name: …`, …) — start from an example in "
        "examples/, e.g. examples/hello/enclaver.yaml"]),
}


def test_there_are_at_least_20_broken_manifests() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_broken_manifest_message(case: str, cli, in_tmp) -> None:
    text, expected = CASES[case]
    (in_tmp / F).write_text(text)
    result = cli("manifest", "check", F)
    assert result.code == 2
    *diagnostics, summary = result.lines
    assert diagnostics == [e.replace("{dir}", str(in_tmp)) for e in expected]
    assert summary.startswith(f"{F}: invalid (")


def test_every_problem_is_reported_at_once(cli, in_tmp) -> None:
    text = (HEAD.replace("version: v1", "version: v9") + "memory_mb: 1\ningress:\n  - listen_port: 17002\n"
            "egress:\n  allow: ['*.*', example.com:80]\ndefaults:\n  cpu_count: 0\n")
    (in_tmp / F).write_text(text)
    result = cli("manifest", "check", "--json", F)
    assert result.code == 2
    [file] = result.json()["files"]
    fields = [d["field"] for d in file["diagnostics"]]
    assert fields == ["version", "memory_mb", "ingress[0].listen_port", "egress.allow[0]", "egress.allow[1]",
                      "defaults.cpu_count"]
    assert all(d["line"] and d["col"] and d["fix"] for d in file["diagnostics"])


def test_not_utf8(cli, in_tmp) -> None:
    (in_tmp / F).write_bytes(HEAD.encode() + b"# caf\xe9\n")
    result = cli("manifest", "check", F)
    assert result.lines[0] == f"{F}:6:6: byte 0xe9 is not UTF-8 — save the file as UTF-8 text"


def test_missing_file_and_directory(cli, in_tmp) -> None:
    result = cli("manifest", "check", "nope.yaml", ".")
    assert result.code == 2
    assert result.lines[0] == ("nope.yaml: cannot read the manifest: no such file — give the manifest's path with -f, "
                               "or run where enclaver.yaml is")
    assert result.lines[2] == ".: is a directory — give the manifest inside it: ./enclaver.yaml"


def test_alias_bomb_is_refused(cli, in_tmp) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 9)]
    (in_tmp / F).write_text("\n".join(lines) + "\n")
    result = cli("manifest", "check", F)
    assert result.code == 2
    assert "the document expands to more than 20000 nodes" in result.stdout


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=20),
                    st.floats(allow_nan=False))
keys = st.one_of(st.sampled_from(["version", "name", "target", "sources", "app", "ingress", "listen_port", "egress",
                                  "allow", "deny", "defaults", "memory_mb", "kms_proxy", "endpoints", "api", "spire",
                                  "signature", "tls", "supervisor"]), st.text(max_size=8))
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=6),
                         max_leaves=30)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_any_text_gives_diagnostics_never_an_exception(tmp_path: Path, text: str) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    result = check_file(str(path))
    assert all(d.file == str(path) and d.message for d in result.diagnostics)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(keys, documents, max_size=8))
def test_any_yaml_data_gives_diagnostics_never_an_exception(tmp_path: Path, data: dict[str, object]) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text(yaml.safe_dump(data))
    result = check_file(str(path))
    assert all(d.line >= 1 and d.fix for d in result.diagnostics if d.severity == "error"), result.diagnostics


def test_non_list_allow_with_kms_proxy_is_diagnosed(cli, in_tmp) -> None:  # type: ignore[no-untyped-def]
    """Found by the property above: `allow: true` next to kms_proxy crashed the KMS check."""
    (in_tmp / F).write_text(HEAD + "egress:\n  allow: true\nkms_proxy:\n  listen_port: 9999\n")
    result = cli("manifest", "check", F)
    assert result.code == 2 and "egress.allow: expected a list, got a boolean true" in result.stdout
