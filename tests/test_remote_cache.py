"""The shared remote cache against a real registry (distribution 2.8): a second machine fetches
the EIF instead of building it, a poisoned entry is refused and replaced, an unreachable cache
never fails a build, and a read-only cache is never written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.registry import NotFound, Registry
from enclaver_rules.rules.eif import OUTPUTS
from enclaver_rules.rules.remote_cache import ENV, ENV_READ_ONLY, RemoteCache, artifact_type, entry_manifest, tag
from pipeline import doit, ran, summary

pytestmark = pytest.mark.services


def machine(template: Path, where: Path) -> Path:
    """A fresh clone of the monorepo with its own cache: another developer, another CI runner."""
    root = where / "repo"
    shutil.copytree(template, root, symlinks=True)
    return root


def entry(root: Path, name: str) -> tuple[str, Path]:
    latest = (root / "cache" / "out" / name / "latest").resolve()
    return latest.name, latest


def test_entry_manifest_is_canonical_and_names_its_key() -> None:
    files = [(OUTPUTS[0], Digest.of(b"{}"), 2), (OUTPUTS[2], Digest.of(b"eif"), 3)]
    one = entry_manifest("eif", "ab" * 16, files, created=1700000000)
    assert one == entry_manifest("eif", "ab" * 16, files, created=1700000000)  # the same outputs, the same digest
    doc = json.loads(one)
    assert doc["artifactType"] == artifact_type("eif") and doc["annotations"]["dev.enclaver.cache.key"] == "ab" * 16
    assert [layer["annotations"]["org.opencontainers.image.title"] for layer in doc["layers"]] == \
        ["eif.json", "application.eif"]
    assert tag("eif", "ab" * 16) == "eif-" + "ab" * 16
    assert RemoteCache.from_env({}) is None
    assert RemoteCache.from_env({ENV: "r.example:5000/c", ENV_READ_ONLY: "1"}) == RemoteCache("r.example:5000/c", True)


def test_a_second_machine_fetches_the_eif_instead_of_building_it(template: Path, tmp_path: Path, registry,  # type: ignore[no-untyped-def]
                                                                 cli, monkeypatch: pytest.MonkeyPatch) -> None:
    location = f"{registry.address}/enclaver-cache"
    first = machine(template, tmp_path / "ci")
    built = doit(first, "build:alpha", env={ENV: location})
    assert built.returncode == 0, built.stdout + built.stderr
    assert f"stored in the remote cache {location}" in built.stdout
    key, first_entry = entry(first, "alpha")
    raw, _ = Registry(registry.address).get_manifest("enclaver-cache", tag("eif", key))
    assert json.loads(raw)["artifactType"] == artifact_type("eif")

    second = machine(template, tmp_path / "laptop")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # as doit() does: part of the key
    result = cli("build", "-f", str(second / "services" / "alpha" / "enclaver.yaml"), "--cache-dir",
                 str(second / "cache"), "--remote-cache", location, "--remote-cache-read-only",
                 "--remote-cache-check-pcrs", "--json")  # every PCR recomputed: the opt-in path, end to end
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["eif_origin"] == f"remote cache {location}"
    assert doc["Measurements"] == summary(first, "alpha")["measurements"]
    second_key, second_entry = entry(second, "alpha")
    assert second_key == key
    assert (second_entry / "application.eif").read_bytes() == (first_entry / "application.eif").read_bytes()
    # the release image made from the fetched EIF is the one the first machine made
    assert summary(second, "alpha")["release_image"] == summary(first, "alpha")["release_image"]
    again = doit(second, "build:alpha", env={ENV: location})
    assert again.returncode == 0 and not ran(again.stdout, "eif:alpha")  # now a local hit


def _poison(source: Path, into: Path, how: str, other: Path) -> Path:
    shutil.copytree(source, into)
    record = json.loads((into / "eif.json").read_text())
    eif = into / "application.eif"
    if how == "flipped byte":
        data = bytearray(eif.read_bytes())
        data[len(data) // 2] ^= 1
        eif.write_bytes(bytes(data))
    elif how == "claimed PCRs":
        doc = json.loads((into / "measurements.json").read_text())
        doc["Measurements"]["PCR0"] = "00" * 48
        (into / "measurements.json").write_text(json.dumps(doc))
    elif how == "another enclave's EIF":  # self-consistent: digest and PCRs rewritten to match the bytes
        other_record = json.loads((other / "eif.json").read_text())
        shutil.copyfile(other / "application.eif", eif)
        shutil.copyfile(other / "measurements.json", into / "measurements.json")
        record["eif"] = other_record["eif"]
        record["measurements"] = other_record["measurements"]
    elif how == "another key":
        record["key"] = "0" * 32
    elif how == "another app in the record":  # the release image's labels would repeat it
        record["inputs"]["app"]["digest"] = "sha256:" + "0" * 64
    (into / "eif.json").write_text(json.dumps(record))
    return into


POISONS = {
    "flipped byte": "the EIF's digest is not the one its record gives",
    "claimed PCRs": "its two records (eif.json, measurements.json) give different PCRs",
    "another enclave's EIF": "the EIF's metadata names another enclave image or blob set",
    "another key": "it records key '00000000000000000000000000000000'",
    "another app in the record": "it records app digest 'sha256:000000",
    "entry of another key under this tag": "the entry says it is 'eif' '00000000000000000000000000000000'",
}


@pytest.mark.parametrize("how", sorted(POISONS))
def test_a_poisoned_entry_is_refused_built_locally_and_replaced(template: Path, tmp_path: Path, registry,  # type: ignore[no-untyped-def]
                                                                how: str) -> None:
    location = f"{registry.address}/poison-{how.lower().replace(' ', '-').replace(chr(39), '')}"
    first = machine(template, tmp_path / "ci")
    assert doit(first, "build:alpha", "build:beta").returncode == 0
    key, good = entry(first, "alpha")
    _, beta = entry(first, "beta")
    poisoned = _poison(good, tmp_path / "poisoned", how, beta)
    if how == "entry of another key under this tag":
        other = "0" * 32
        assert RemoteCache(location).upload("eif", other, poisoned, OUTPUTS, 1700000000) is not None
        reg = Registry(registry.address)
        raw, media_type = reg.get_manifest(location.split("/", 1)[1], tag("eif", other))
        reg.put_manifest(location.split("/", 1)[1], tag("eif", key), raw, media_type)
    else:
        assert RemoteCache(location).upload("eif", key, poisoned, OUTPUTS, 1700000000) is not None

    second = machine(template, tmp_path / "victim")
    result = doit(second, "build:alpha", env={ENV: location})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refused:" in result.stdout and POISONS[how] in result.stdout, result.stdout
    assert summary(second, "alpha")["measurements"] == summary(first, "alpha")["measurements"]  # built locally
    assert (entry(second, "alpha")[1] / "application.eif").read_bytes() == (good / "application.eif").read_bytes()
    assert f"stored in the remote cache {location}" in result.stdout  # the good entry replaced the poisoned one

    third = machine(template, tmp_path / "next")
    healed = doit(third, "build:alpha", env={ENV: location})
    assert healed.returncode == 0 and "fetched from the remote cache" in healed.stdout, healed.stdout


def test_an_unreachable_or_read_only_cache_never_fails_the_build(template: Path, tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    root = machine(template, tmp_path / "offline")
    result = doit(root, "build:gamma", env={ENV: "127.0.0.1:9/enclaver-cache"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unreachable, building locally" in result.stdout

    location = f"{registry.address}/read-only"
    fresh = machine(template, tmp_path / "reader")
    result = doit(fresh, "build:gamma", env={ENV: location, ENV_READ_ONLY: "1"})
    assert result.returncode == 0 and "stored in the remote cache" not in result.stdout
    key, _ = entry(fresh, "gamma")
    with pytest.raises(NotFound):
        Registry(registry.address).get_manifest("read-only", tag("eif", key))
