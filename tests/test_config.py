"""Configuration precedence: flag > ENC_* variable > manifest file > built-in default."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import HEAD_VALID as HEAD
from enclaver_rules.manifest import overridable_settings, resolve, settings
from enclaver_rules.manifest.config import report_conflicts


@pytest.fixture
def manifest(tmp_path: Path) -> str:
    path = tmp_path / "enclaver.yaml"
    path.write_text(HEAD + "defaults:\n  memory_mb: 512\n")
    return str(path)


def value(config, key: str):  # type: ignore[no-untyped-def]
    return next(v for v in config.values if v.setting.key == key)


def test_names_are_derived_from_the_path() -> None:
    by_key = {s.key: s for s in settings()}
    s = by_key["defaults.memory_mb"]
    assert (s.flag, s.env) == ("--defaults-memory-mb", "ENC_DEFAULTS_MEMORY_MB")
    assert by_key["sources.app"].env == "ENC_SOURCES_APP"


def test_only_fields_odyn_never_reads_are_overridable() -> None:
    assert {s.key for s in overridable_settings()} == {
        "target", "sources.app", "sources.odyn", "sources.sleeve", "signature.certificate", "signature.key",
        "defaults.cpu_count", "defaults.memory_mb", "build.backend", "build.nitro_cli_image", "build.blobs"}
    policy = {"ingress", "egress", "kms_proxy", "api"}
    assert not any(s.key.split(".")[0] in policy for s in overridable_settings())


def test_every_documented_field_is_listed_once() -> None:
    keys = [s.key for s in settings()]
    assert len(keys) == len(set(keys))
    assert "sources.supervisor" not in keys and not any(k.startswith("spire") for k in keys)
    assert {"version", "name", "ingress", "egress.allow", "kms_proxy.endpoints", "api.listen_port"} <= set(keys)


@pytest.mark.parametrize("flag, env, expected, origin", [
    (None, None, 512, "file"),
    (None, "1024", 1024, "env"),
    ("2048", "1024", 2048, "flag"),
    ("2048", None, 2048, "flag"),
])
def test_precedence(manifest: str, flag: str | None, env: str | None, expected: int, origin: str) -> None:
    config = resolve(manifest, {"defaults.memory_mb": flag}, {"ENC_DEFAULTS_MEMORY_MB": env} if env else {})
    v = value(config, "defaults.memory_mb")
    assert (v.value, v.origin) == (expected, origin)
    assert config.manifest is not None and config.manifest.defaults.memory_mb == expected


def test_default_when_nobody_sets_it(manifest: str) -> None:
    v = value(resolve(manifest), "defaults.cpu_count")
    assert (v.value, v.origin, v.source) == (2, "default", "built-in")


def test_file_origin_names_line_and_column(manifest: str) -> None:
    v = value(resolve(manifest), "defaults.memory_mb")
    assert v.source == f"{manifest}:7:14"


def test_override_creates_a_missing_section(tmp_path: Path) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text(HEAD)
    config = resolve(str(path), {"defaults.cpu_count": "4"}, {})
    assert config.manifest is not None and config.manifest.defaults.cpu_count == 4
    assert config.manifest.raw == HEAD.encode()  # the file's bytes are never rewritten


def test_env_empty_means_unset(manifest: str) -> None:
    assert value(resolve(manifest, {}, {"ENC_DEFAULTS_MEMORY_MB": ""}), "defaults.memory_mb").origin == "file"


def test_invalid_override_names_its_source(manifest: str) -> None:
    config = resolve(manifest, {}, {"ENC_DEFAULTS_MEMORY_MB": "32"})
    assert config.manifest is None
    assert [str(d) for d in config.errors] == [
        "ENC_DEFAULTS_MEMORY_MB: defaults.memory_mb: 32 is less than the minimum 64 — give a whole number of MiB, "
        "at least 64 (the Nitro driver's minimum), e.g. `memory_mb: 4096`"]
    config = resolve(manifest, {"defaults.cpu_count": "two"}, {})
    assert [str(d) for d in config.errors] == [
        "--defaults-cpu-count: defaults.cpu_count: 'two' is not a whole number — give a whole number of vCPUs, "
        "at least 1, e.g. `cpu_count: 2`"]


def test_a_flag_creating_half_a_section_is_reported_against_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text(HEAD)
    config = resolve(str(path), {"signature.key": "key.pem"}, {})
    messages = [str(d) for d in config.errors]
    assert messages == ["--signature-key: signature: missing required key `certificate` — "
                        "add `certificate: signing/cert.pem` under `signature:`"]


def test_policy_cannot_come_from_the_environment(manifest: str) -> None:
    config = resolve(manifest, {}, {"ENC_EGRESS_ALLOW": "**"})
    assert config.manifest is None
    [error] = config.errors
    assert str(error).startswith("ENC_EGRESS_ALLOW: egress.allow: is set in the manifest only")
    assert error.fix == "unset ENC_EGRESS_ALLOW and edit `egress.allow` in enclaver.yaml"


def test_unknown_variable_gets_did_you_mean(manifest: str) -> None:
    config = resolve(manifest, {}, {"ENC_DEFAULT_MEMORY_MB": "1"})
    assert config.manifest is not None
    [w] = [d for d in config.diagnostics if d.severity == "warning"]
    assert str(w) == "ENC_DEFAULT_MEMORY_MB: warning: not an enclaver setting — did you mean ENC_DEFAULTS_MEMORY_MB?"


def test_tool_variables_are_not_taken_for_mistyped_settings(manifest: str) -> None:
    from enclaver_rules.manifest.config import TOOL_VARIABLES

    assert {"ENC_REMOTE_CACHE", "ENC_REMOTE_CACHE_READ_ONLY", "ENC_INSECURE_REGISTRY"} <= set(TOOL_VARIABLES)
    config = resolve(manifest, {}, dict.fromkeys(TOOL_VARIABLES, "x"))
    assert config.manifest is not None and not config.diagnostics


def test_conflicts_are_listed_and_logged_once(manifest: str, caplog: pytest.LogCaptureFixture) -> None:
    flags, env = {"defaults.memory_mb": "2048"}, {"ENC_DEFAULTS_MEMORY_MB": "1024"}
    config = resolve(manifest, flags, env)
    v = value(config, "defaults.memory_mb")
    assert [(c.origin, c.value) for c in v.overridden] == [("env", 1024), ("file", 512)]
    logger = logging.getLogger("enclaver.test-conflicts")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        report_conflicts(config, logger)
        report_conflicts(resolve(manifest, flags, env), logger)  # a second task resolving the same config
    assert [r.getMessage() for r in caplog.records] == [
        f"defaults.memory_mb: 2048 from --defaults-memory-mb overrides 1024 from ENC_DEFAULTS_MEMORY_MB and "
        f"512 from {manifest}:7:14"]


def test_equal_values_are_no_conflict(manifest: str) -> None:
    config = resolve(manifest, {}, {"ENC_DEFAULTS_MEMORY_MB": "512"})
    assert config.conflicts() == ()


def test_signature_paths_resolve_by_origin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "cert.pem").write_text("x")
    (tmp_path / "m" / "key.pem").write_text("x")
    (tmp_path / "cwd").mkdir()
    path = tmp_path / "m" / "enclaver.yaml"
    path.write_text(HEAD + "signature:\n  certificate: cert.pem\n  key: key.pem\n")
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve(str(path)).diagnostics == ()  # relative to the manifest
    warnings = [d for d in resolve(str(path), {"signature.key": "key.pem"}).diagnostics]
    assert [(d.file, d.field) for d in warnings] == [("--signature-key", "signature.key")]  # relative to cwd


def test_config_show_cli(cli, manifest: str) -> None:
    result = cli("config", "show", "-f", manifest, "--json", "--defaults-cpu-count", "4",
                 env={"ENC_TARGET": "registry.example.com/app:ci"})
    assert result.code == 0
    doc = result.json()
    assert doc["version"] == 1 and doc["valid"] is True
    s = doc["settings"]
    assert s["defaults.cpu_count"] == {"value": 4, "origin": "flag", "source": "--defaults-cpu-count",
                                       "overridable": True, "flag": "--defaults-cpu-count",
                                       "env": "ENC_DEFAULTS_CPU_COUNT", "overridden": []}
    assert (s["target"]["origin"], s["target"]["value"]) == ("env", "registry.example.com/app:ci")
    assert s["target"]["overridden"][0]["origin"] == "file"
    assert (s["defaults.memory_mb"]["origin"], s["egress.proxy_port"]["origin"]) == ("file", "default")
    assert s["ingress"]["overridable"] is False
    assert "warning: target: registry.example.com/app:ci from ENC_TARGET overrides" in result.stderr


def test_config_show_people_output(cli, manifest: str) -> None:
    result = cli("config", "show", "-f", manifest)
    assert result.code == 0
    assert result.lines[0].split() == ["setting", "value", "origin", "source"]
    row = next(line for line in result.lines if line.startswith("defaults.memory_mb"))
    assert row.split() == ["defaults.memory_mb", "512", "file", f"{manifest}:7:14"]
    assert next(line for line in result.lines if line.startswith("egress.allow")).split()[2] == "default*"


def test_config_show_invalid_exits_2_but_still_shows(cli, manifest: str) -> None:
    result = cli("config", "show", "-f", manifest, "--defaults-memory-mb", "1")
    assert result.code == 2
    assert any(line.startswith("defaults.memory_mb") for line in result.lines)
    assert "--defaults-memory-mb: defaults.memory_mb: 1 is less than the minimum 64" in result.stderr
