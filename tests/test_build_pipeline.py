"""The rule set end to end through doit: a monorepo of three enclaves built with `doit -n 2`, no-op
rebuilds, one changed app byte re-running only its enclave, `kill -9` mid-build, tampered outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.layer import Entry
from enclaver_rules.oci.store import Store
from oci_helpers import make_layout
from pipeline import DOIT, NAMES, doit, make_app, ran, summary

#: trust:<name> (run by a bare `doit` here, and before every push:<name>) has no default account
KMS = {"ENC_KMS_ACCOUNT": "111122223333"}


def test_a_monorepo_builds_in_parallel_and_rebuilds_nothing_when_nothing_changed(monorepo: Path) -> None:
    first = doit(monorepo, "-n", "2", "build")
    assert first.returncode == 0, first.stdout + first.stderr
    store = Store(monorepo / "cache")
    for name in NAMES:
        s = summary(monorepo, name)
        assert ran(first.stdout, f"eif:{name}")
        out = monorepo / "cache" / "out" / name / "latest"
        measurements = json.loads((out / "measurements.json").read_text())["Measurements"]
        assert measurements["PCR0"] == s["measurements"]["PCR0"] and len(measurements["PCR0"]) == 96  # type: ignore[index]
        assert store.resolve(f"example.test/{name}:release") is not None
        assert s["development"] is True  # dev blobs: said in the record
    pcr0 = {name: summary(monorepo, name)["measurements"]["PCR0"] for name in NAMES}  # type: ignore[index]
    assert len(set(pcr0.values())) == 3  # three different apps

    again = doit(monorepo, "-n", "2", "build")
    assert again.returncode == 0, again.stderr
    for name in NAMES:
        for step in ("layer", "eif", "release", "trust"):
            assert not ran(again.stdout, f"{step}:{name}"), again.stdout  # up to date: "-- <step>:<name>"


def test_one_changed_app_byte_rebuilds_only_its_enclave(monorepo: Path) -> None:
    assert doit(monorepo, "build").returncode == 0
    before = {name: summary(monorepo, name) for name in NAMES}
    make_app(monorepo / "services" / "beta", "#!/bin/sh\necho Beta\n")  # one byte differs
    result = doit(monorepo, "build")
    assert result.returncode == 0, result.stderr
    assert ran(result.stdout, "eif:beta")
    assert not ran(result.stdout, "eif:alpha") and not ran(result.stdout, "eif:gamma")
    after = {name: summary(monorepo, name) for name in NAMES}
    assert after["beta"]["key"] != before["beta"]["key"]
    assert after["alpha"] == before["alpha"] and after["gamma"] == before["gamma"]
    # the builds are deterministic: the same inputs give the same PCRs in another cache
    assert after["beta"]["measurements"] != before["beta"]["measurements"]


def test_a_new_source_date_epoch_or_target_rebuilds_what_it_reaches(monorepo: Path) -> None:
    """Settings that reach the outputs without changing a file doit watches: resolve records them."""
    assert doit(monorepo, "build:alpha").returncode == 0
    before = summary(monorepo, "alpha")
    later = doit(monorepo, "build:alpha", env={"SOURCE_DATE_EPOCH": "1700000001"})
    assert later.returncode == 0 and ran(later.stdout, "layer:alpha") and ran(later.stdout, "eif:alpha")
    assert summary(monorepo, "alpha")["key"] != before["key"] and summary(monorepo, "alpha")["epoch"] == 1700000001
    retarget = doit(monorepo, "build:alpha", env={"ENC_TARGET": "example.test/alpha:other"})
    assert retarget.returncode == 0 and ran(retarget.stdout, "eif:alpha")  # the target is the EIF's image name
    layered = summary(monorepo, "alpha")["enclave_image"]
    assert summary(monorepo, "alpha")["target"] == "example.test/alpha:other"
    assert layered == before["enclave_image"]  # layer:alpha ran (its input record changed), found its key built
    back = doit(monorepo, "build:alpha")  # the first inputs again: the first entry, reused
    assert back.returncode == 0 and summary(monorepo, "alpha") == before


def test_the_release_image_names_its_git_commit_without_credentials(monorepo: Path) -> None:
    from enclaver_rules.oci.model import ImageConfig, Manifest

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(monorepo), "-c", "user.name=t", "-c", "user.email=t@example.test",
                               *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("remote", "add", "origin", "https://ci-bot:s3cr3t@git.example.test/team/enclaves.git")
    (monorepo / ".gitignore").write_text("/cache/\n__pycache__/\n")
    git("add", "-A")  # the manifest is in the commit: else the revision is `+dirty`
    git("commit", "-q", "-m", "one")
    assert doit(monorepo, "build:alpha").returncode == 0
    first = summary(monorepo, "alpha")

    def labels() -> dict[str, str]:
        store = Store(monorepo / "cache")
        image = store.manifest(Digest.parse(str(summary(monorepo, "alpha")["release_image"])))
        assert isinstance(image, Manifest)
        config = ImageConfig.parse(store.read(image.config.digest), "release config")
        # the release's labels, also as OCI annotations; the config adds only its base's (the runtime image's)
        assert dict(image.annotations).items() <= config.labels.items()
        assert {k for k in config.labels if k not in dict(image.annotations)} <= {
            k for k in config.labels if k.startswith("dev.enclaver.runtime.") or k.startswith("org.opencontainers")}
        return config.labels

    assert labels()["org.opencontainers.image.revision"] == git("rev-parse", "HEAD")
    assert labels()["org.opencontainers.image.source"] == "https://git.example.test/team/enclaves.git"
    assert "s3cr3t" not in json.dumps(labels())
    git("commit", "-q", "--allow-empty", "-m", "two")  # same inputs, new commit: same EIF, new labels
    again = doit(monorepo, "build:alpha")
    assert again.returncode == 0 and ran(again.stdout, "release:alpha")
    assert summary(monorepo, "alpha")["key"] == first["key"]
    assert labels()["org.opencontainers.image.revision"] == git("rev-parse", "HEAD")
    assert summary(monorepo, "alpha")["release_image"] != first["release_image"]


def test_the_sleeve_is_the_release_images_base_and_a_new_one_reuses_the_eif(monorepo: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from enclaver_rules.oci.model import ImageConfig, Manifest

    directory = monorepo / "services" / "gamma"

    def sleeve(version: str) -> None:
        shutil.rmtree(directory / "sleeve", ignore_errors=True)
        make_layout(str(directory / "sleeve"), "v", [[Entry.file("usr/bin/runner", version.encode(), 0o755)]],
                    cmd=("/usr/bin/runner", "--run"))

    def release() -> tuple[Manifest, ImageConfig]:
        store = Store(monorepo / "cache")
        image = store.manifest(Digest.parse(str(summary(monorepo, "gamma")["release_image"])))
        assert isinstance(image, Manifest)
        return image, ImageConfig.parse(store.read(image.config.digest), "release config")

    sleeve("runner v1")
    manifest = directory / "enclaver.yaml"
    manifest.write_text(manifest.read_text().replace("  app: oci:app:latest\n", "  app: oci:app:latest\n  wrapper: oci:sleeve:v\n"))
    assert doit(monorepo, "build:gamma").returncode == 0  # `wrapper`: upstream's old name, still taken
    first = summary(monorepo, "gamma")
    image, config = release()
    assert len(image.layers) == 2 and config.cmd == ["/usr/bin/runner", "--run"]  # the sleeve's, kept
    assert config.labels["dev.enclaver.sleeve.digest"] == json.loads(
        (monorepo / "cache" / "out" / "gamma" / "resolved.json").read_text())["sleeve"]["digest"]
    assert cli("lock", "-f", str(manifest), "--cache-dir", str(monorepo / "cache")).code == 0
    assert "sleeve" in json.loads((directory / "enclaver.lock").read_text())  # pinned like the other inputs

    sleeve("runner v2")
    refused = doit(monorepo, "build:gamma")
    assert refused.returncode != 0 and "sleeve: the lock pins" in refused.stdout + refused.stderr
    assert cli("lock", "-f", str(manifest), "--cache-dir", str(monorepo / "cache"), "--update").code == 0
    again = doit(monorepo, "build:gamma")
    assert again.returncode == 0 and ran(again.stdout, "release:gamma"), again.stdout + again.stderr
    assert summary(monorepo, "gamma")["key"] == first["key"]  # the EIF does not hold the sleeve
    assert summary(monorepo, "gamma")["release_image"] != first["release_image"]


def test_kill_9_mid_build_then_rebuild_gives_the_clean_result(monorepo: Path, tmp_path: Path) -> None:
    clean = monorepo.parent / "clean"
    shutil.copytree(monorepo, clean)
    assert doit(clean, "build:alpha").returncode == 0
    expected = summary(clean, "alpha")

    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    proc = subprocess.Popen(DOIT + ["build:alpha"], cwd=monorepo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    out = monorepo / "cache" / "out" / "alpha"
    deadline = time.monotonic() + 120
    while not list(out.glob(".tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert list(out.glob(".tmp-*")), "the build ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "latest").exists()  # nothing half-built was published
    result = doit(monorepo, "build:alpha")
    assert result.returncode == 0, result.stdout + result.stderr
    got = summary(monorepo, "alpha")
    assert got["measurements"] == expected["measurements"]
    assert got["eif"]["sha256"] == expected["eif"]["sha256"]  # type: ignore[index]
    assert not list(out.glob(".tmp-*"))  # the killed build's leftovers are gone


def test_a_tampered_output_is_detected_and_rebuilt(monorepo: Path) -> None:
    assert doit(monorepo, "build:gamma").returncode == 0
    good = summary(monorepo, "gamma")
    eif = monorepo / "cache" / "out" / "gamma" / "latest" / "application.eif"
    data = bytearray(eif.read_bytes())
    data[len(data) // 2] ^= 0xFF
    eif.write_bytes(bytes(data))
    result = doit(monorepo, "build:gamma")
    assert result.returncode == 0 and ran(result.stdout, "eif:gamma"), result.stdout
    rebuilt = summary(monorepo, "gamma")
    assert rebuilt["measurements"] == good["measurements"] and rebuilt["eif"]["sha256"] == good["eif"]["sha256"]  # type: ignore[index]
    assert eif.read_bytes() != bytes(data)


def test_trust_reads_the_same_pcrs_from_the_eif_the_build_dir_and_the_release_image(monorepo: Path, cli) -> None:  # type: ignore[no-untyped-def]
    assert doit(monorepo, "build:alpha").returncode == 0
    built = summary(monorepo, "alpha")["measurements"]
    latest = monorepo / "cache" / "out" / "alpha" / "latest"
    sources = {
        str(latest / "application.eif"): "recomputed from the EIF",
        str(latest): "recomputed from the EIF",
        str(latest / "measurements.json"): "read from",
        "example.test/alpha:release": "read from the labels of example.test/alpha:release",
    }
    for source, how in sources.items():
        result = cli("trust", source, "--cache-dir", str(monorepo / "cache"), "--json")
        assert result.code == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["Measurements"] == built and doc["Source"].startswith(how)

    result = cli("trust", str(latest), "--kms-policy", "--account", "111122223333", "--pcr", "PCR2",
                 "--principal", "arn:aws:iam::111122223333:role/Parent", "--json")
    assert result.code == 0, result.stderr
    policy = json.loads(result.stdout)["KeyPolicy"]
    allow = [s for s in policy["Statement"] if s["Sid"].startswith("EnclaveMayDecrypt")]
    assert allow[0]["Condition"]["StringEqualsIgnoreCase"] == {
        "kms:RecipientAttestation:ImageSha384": built["PCR0"],  # type: ignore[index]
        "kms:RecipientAttestation:PCR2": built["PCR2"]}  # type: ignore[index]

    # a new release: --update keeps the old image for the rollover and prints what changed
    (monorepo / "policy.json").write_text(json.dumps(policy))
    make_app(monorepo / "services" / "alpha", "#!/bin/sh\necho v2\n")
    assert doit(monorepo, "build:alpha").returncode == 0
    result = cli("trust", str(latest), "--update", str(monorepo / "policy.json"), "--account", "111122223333",
                 "--json")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    trusted = next(s for s in doc["KeyPolicy"]["Statement"] if s["Effect"] == "Deny")
    assert sorted(trusted["Condition"]["StringNotEqualsIgnoreCase"]["kms:RecipientAttestation:ImageSha384"]) == \
        sorted([built["PCR0"], doc["Measurements"]["PCR0"]])  # type: ignore[index]
    assert any(line.startswith("+") for line in doc["Diff"])


def test_trust_refuses_what_it_cannot_read(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "x.json").write_text("{}")
    assert cli("trust", str(tmp_path / "x.json")).code == 1
    assert cli("trust", "no.such/image:tag", "--cache-dir", str(tmp_path)).code == 1
    zeros = tmp_path / "m.json"
    zeros.write_text(json.dumps({"Measurements": {"PCR0": "0" * 96, "PCR1": "0" * 96, "PCR2": "0" * 96}}))
    result = cli("trust", str(zeros))
    assert result.code == 2 and "debug-mode" in result.stderr
    assert cli("trust", str(zeros), "--allow-debug").code == 0


def test_a_bare_doit_builds_the_hello_example_with_no_docker_engine(template: Path, tmp_path: Path, cli,  # type: ignore[no-untyped-def]
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """README command (a): this repository's dodo.py, its examples, nothing from outside."""
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    root = tmp_path / "clone"
    root.mkdir()
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copytree(REPO / "examples", root / "examples",
                    ignore=shutil.ignore_patterns("image", "blobs-dev", "__pycache__"))
    shutil.copytree(template / "cache", root / "cache")  # only to skip rebuilding the same odyn image
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock", **KMS}  # no engine to lean on
    result = subprocess.run(DOIT, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    s = summary(root, "hello")
    assert f"hello: PCR0 {s['measurements']['PCR0']}" in result.stdout  # type: ignore[index]
    policy_line = next(line for line in result.stdout.splitlines() if "KMS key policy written to" in line)
    policy = json.loads(Path(policy_line.rsplit(" ", 1)[1]).read_text())
    # (a) again: nothing is rebuilt, and it still says what the PCRs are and where everything is
    again = subprocess.run(DOIT, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert not any(ran(again.stdout, f"{step}:hello") for step in ("layer", "eif", "release", "trust"))
    assert f"hello: PCR0 {s['measurements']['PCR0']}" in again.stdout  # type: ignore[index]
    assert f"hello: KMS key policy {policy_line.rsplit(' ', 1)[1]}" in again.stdout
    assert "hello: measurements " in again.stdout
    assert policy["Statement"][1]["Condition"]["StringEqualsIgnoreCase"][
        "kms:RecipientAttestation:ImageSha384"] == s["measurements"]["PCR0"]  # type: ignore[index]
    trust = cli("trust", "enclaver-examples/hello:enclave", "--cache-dir", str(root / "cache"), "--json")
    assert trust.code == 0 and json.loads(trust.stdout)["Measurements"] == s["measurements"]


def test_the_no_fly_list_example_builds_from_debian_packages(template: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """examples/no-fly-list: a Python root made here by mmdebstrap (python3, boto3, cryptography from
    Debian) plus the app, built end to end like hello; the enclave image runs the app under odyn."""
    import io

    from enclaver_rules.oci.model import ImageConfig, Manifest

    root = tmp_path / "clone"
    root.mkdir()
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copytree(REPO / "examples", root / "examples",
                    ignore=shutil.ignore_patterns("image", "blobs-dev", "__pycache__"))
    shutil.copytree(template / "cache", root / "cache")
    result = doit(root, "trust:no-fly-list", "show:no-fly-list", env=KMS)
    assert result.returncode == 0, result.stdout + result.stderr
    s = summary(root, "no-fly-list")
    assert f"no-fly-list: PCR0 {s['measurements']['PCR0']}" in result.stdout  # type: ignore[index]
    store = Store(root / "cache")
    enclave = store.manifest(Digest.parse(str(s["enclave_image"])))
    assert isinstance(enclave, Manifest)
    config = ImageConfig.parse(store.read(enclave.config.digest), "enclave config")
    assert list(config.entrypoint)[-2:] == ["/usr/bin/python3", "/app/no_fly_list.py"]
    for path in ("usr/bin/python3.11", "app/no_fly_list.py", "sbin/odyn", "etc/enclaver/enclaver.yaml"):
        assert store.copy_file(enclave, path, io.BytesIO()), path
    assert store.copy_file(enclave, "usr/lib/python3/dist-packages/boto3/__init__.py", io.BytesIO())
    trust = cli("trust", "enclaver-examples/no-fly-list:enclave", "--cache-dir", str(root / "cache"), "--json")
    assert trust.code == 0 and json.loads(trust.stdout)["Measurements"] == s["measurements"]


def test_enclaver_build_runs_the_same_tasks_and_prints_the_summary(monorepo: Path, cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # as doit() below: part of the key
    monkeypatch.delenv("ENC_KMS_ACCOUNT", raising=False)  # no account: the build stops at the release image
    manifest = monorepo / "services" / "beta" / "enclaver.yaml"
    copy = tmp_path / "beta.eif"
    result = cli("build", "-f", str(manifest), "--cache-dir", str(monorepo / "cache"), "--eif-only", str(copy),
                 "--json")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["release_image"]["tag"] == "example.test/beta:release"
    assert copy.read_bytes() == Path(doc["outputs"]["eif"]).read_bytes()
    # doit then finds it built: the same key, the same PCRs
    assert doit(monorepo, "build:beta").returncode == 0
    assert summary(monorepo, "beta")["measurements"] == doc["Measurements"]
    assert "✓ layer:beta" in result.stderr and "✓ eif:beta" in result.stderr  # progress, one line per task

    again = cli("build", "-f", str(manifest), "--cache-dir", str(monorepo / "cache"))
    assert again.code == 0 and "= eif:beta (up to date)" in again.stderr, again.stderr
    assert doc["Measurements"]["PCR0"] in again.stdout
    assert "policy" not in doc["outputs"] and "no KMS key policy: set ENC_KMS_ACCOUNT" in again.stderr
    monkeypatch.setenv("ENC_KMS_ACCOUNT", "111122223333")
    with_policy = cli("build", "-f", str(manifest), "--cache-dir", str(monorepo / "cache"), "--json")
    assert with_policy.code == 0, with_policy.stderr
    assert json.loads(Path(json.loads(with_policy.stdout)["outputs"]["policy"]).read_text())["Statement"]

    manifest.write_text(manifest.read_text().replace("listen_port: 8080", "listen_port: 17000"))
    bad = cli("build", "-f", str(manifest), "--cache-dir", str(monorepo / "cache"))
    assert bad.code == 2 and "17000" in bad.stderr
    assert cli("build", "-f", str(tmp_path / "missing.yaml")).code == 2


def test_enclaver_build_draws_progress_for_the_eif(monorepo: Path, cli,  # type: ignore[no-untyped-def]
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The long step reports bytes as it writes them to whoever draws (rich, on a terminal)."""
    import contextlib
    from collections.abc import Callable, Iterator

    seen: dict[str, int] = {}

    class Bars:
        def task(self, description: str, total: int | None) -> Callable[[int], None]:
            seen[description] = 0
            return lambda n: seen.__setitem__(description, seen[description] + n)

        def done(self, description: str) -> None:
            pass

    @contextlib.contextmanager
    def bars(console: object, enabled: bool = True) -> Iterator[Bars]:
        yield Bars()

    monkeypatch.setattr("enclaver_rules.cli.progress.reporter", bars)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    manifest = monorepo / "services" / "alpha" / "enclaver.yaml"
    assert cli("build", "-f", str(manifest), "--cache-dir", str(monorepo / "cache")).code == 0
    eif = monorepo / "cache" / "out" / "alpha" / "latest" / "application.eif"
    assert list(seen) == ["eif alpha"]
    assert 0.99 * eif.stat().st_size <= seen["eif alpha"] <= eif.stat().st_size  # the sections; not the headers


def test_push_sends_the_release_image_and_attaches_measurements_and_policy(monorepo: Path, registry) -> None:  # type: ignore[no-untyped-def]
    from enclaver_rules.oci import referrers
    from enclaver_rules.oci.digest import Digest
    from enclaver_rules.oci.registry import Registry

    manifest = monorepo / "services" / "alpha" / "enclaver.yaml"
    manifest.write_text(manifest.read_text().replace("example.test/alpha:release", f"{registry.address}/alpha:release"))
    result = doit(monorepo, "push:alpha", env=KMS)
    assert result.returncode == 0, result.stdout + result.stderr
    pushed = json.loads((monorepo / "cache" / "out" / "alpha" / "latest" / "pushed.json").read_text())
    s = summary(monorepo, "alpha")
    assert pushed["digest"] == s["release_image"]  # the registry holds the very image built
    assert {r["discovery"] for r in pushed["referrers"]} == {"tag"}  # distribution 2.8: the fallback tag
    reg = Registry(registry.address)
    listed = referrers.list_referrers(reg, "alpha", Digest.parse(pushed["digest"]))
    assert sorted(referrers.artifact_type_of(d) or "" for d in listed) == sorted(
        [referrers.MEASUREMENTS.artifact_type, referrers.KMS_KEY_POLICY.artifact_type])
    measured = next(d for d in listed if referrers.artifact_type_of(d) == referrers.MEASUREMENTS.artifact_type)
    artifact = referrers.fetch_artifact(reg, "alpha", measured, Store(monorepo / "cache"))
    data = artifact.file("measurements.json").data
    assert json.loads(data)["Measurements"]["PCR0"] == s["measurements"]["PCR0"]  # type: ignore[index]
    again = doit(monorepo, "push:alpha", env=KMS)  # up to date: nothing pushed twice
    assert again.returncode == 0 and not ran(again.stdout, "push:alpha")


def test_trust_reads_a_pushed_image_from_its_registry_labels_referrer_or_eif(monorepo: Path, registry, cli,  # type: ignore[no-untyped-def]
                                                                            tmp_path: Path) -> None:
    """A security team's view: no local build, only the registry. Labels and referrers are the
    pusher's claims; --recompute measures the EIF itself and refuses labels that disagree."""
    from enclaver_rules.oci import referrers
    from enclaver_rules.oci.model import Descriptor
    from enclaver_rules.oci.mutate import ConfigEdit, edit_image
    from enclaver_rules.oci.reference import Reference
    from enclaver_rules.oci.registry import Registry
    from enclaver_rules.oci.transfer import load_stored, push

    manifest = monorepo / "services" / "alpha" / "enclaver.yaml"
    manifest.write_text(manifest.read_text().replace("example.test/alpha:release", f"{registry.address}/alpha:release"))
    assert doit(monorepo, "push:alpha", env=KMS).returncode == 0
    pcrs = summary(monorepo, "alpha")["measurements"]
    empty = str(tmp_path / "elsewhere")  # another machine: nothing in its store
    image = f"{registry.address}/alpha:release"

    labels = cli("trust", image, "--cache-dir", empty, "--json")
    assert labels.code == 0 and labels.json()["Measurements"] == pcrs, labels.stderr
    assert labels.json()["Source"].startswith(f"read from the labels of {image}") and "in its registry" in labels.json()["Source"]
    measured = cli("trust", image, "--cache-dir", empty, "--recompute", "--json")
    assert measured.code == 0 and measured.json()["Measurements"] == pcrs, measured.stderr
    assert measured.json()["Source"].endswith("its labels agree")

    reg, store = Registry(registry.address), Store(monorepo / "cache")
    built = load_stored(store, "built", Digest.parse(str(summary(monorepo, "alpha")["release_image"])))
    unlabelled = edit_image(built.manifest, built.config, created=0,
                            edit=ConfigEdit(labels=tuple((k, "") for k in built.config.labels if ".pcr" in k)))
    forged = edit_image(built.manifest, built.config, created=0, edit=ConfigEdit(labels=(("dev.enclaver.pcr0", "ab" * 48),)))
    for name, edited in (("plain", unlabelled), ("forged", forged)):
        store.keep_image(name, edited)
        push(load_stored(store, name, edited.manifest_digest), store, Reference.parse(f"{registry.address}/{name}:v"), reg)
    subject = Descriptor(built.manifest.media_type, unlabelled.manifest_digest, len(unlabelled.manifest))
    measurements = (monorepo / "cache" / "out" / "alpha" / "latest" / "measurements.json").read_bytes()
    referrers.attach(reg, "plain", subject, referrers.MEASUREMENTS.artifact_type,
                     [referrers.MEASUREMENTS.file(measurements)], created=0)
    # the empty labels are not PCRs: the referrer answers
    via_referrer = cli("trust", f"{registry.address}/plain:v", "--cache-dir", empty, "--json")
    assert via_referrer.code == 0, via_referrer.stderr
    assert via_referrer.json()["Measurements"] == pcrs and "measurements referrer" in via_referrer.json()["Source"]
    refused = cli("trust", f"{registry.address}/forged:v", "--cache-dir", empty, "--recompute")
    assert refused.code == 1 and "its labels and its EIF disagree: PCR" in refused.stderr and "do not trust this image" in refused.stderr


def test_verify_reproduce_passes_on_a_rebuild_and_names_the_changed_file(monorepo: Path, cli,  # type: ignore[no-untyped-def]
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """From nothing: a fresh cache, the odyn binary built again from source, the app from its layout."""
    assert doit(monorepo, "build:alpha").returncode == 0
    latest = str(monorepo / "cache" / "out" / "alpha" / "latest")
    manifest = str(monorepo / "services" / "alpha" / "enclaver.yaml")
    result = cli("verify-reproduce", latest, "-f", manifest, "--json")
    assert result.code == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["Reproduced"] and doc["Rebuilt"] == summary(monorepo, "alpha")["measurements"]

    directory = monorepo / "services" / "alpha"
    shutil.rmtree(directory / "app")
    make_layout(str(directory / "app"), "latest", [[Entry.file("bin/app", b"#!/bin/sh\necho alpha\n", 0o755),
                                                    Entry.file("etc/motd", b"hello, changed\n")]],
                cmd=("/bin/app", "--serve"))
    result = cli("verify-reproduce", latest, "-f", manifest)
    assert result.code == 1
    assert "NOT reproduced: PCR0, PCR2 differ" in result.stdout
    assert "rootfs/etc/motd: content differs" in result.stdout and "rootfs/bin/app" not in result.stdout


def test_verify_reproduce_finds_the_eif_beside_a_measurements_file_and_says_what_pcrs_mean(tmp_path: Path) -> None:
    """A build directory's measurements.json has its EIF beside it (used when the build record agrees);
    a lone measurements.json gets what its PCRs mean, and how to have the files named."""
    from enclaver_rules.cli.reproduce import _expected_eif, pcr_reasons

    build = tmp_path / "build"
    build.mkdir()
    pcrs = {"PCR0": "aa" * 48, "PCR1": "bb" * 48, "PCR2": "cc" * 48}
    (build / "application.eif").write_bytes(b".eif" + b"\0" * 600)
    (build / "measurements.json").write_text(json.dumps({"Measurements": pcrs}))
    (build / "build.json").write_text(json.dumps({"measurements": pcrs, "epoch": 1}))
    assert _expected_eif(str(build / "measurements.json"), None, tmp_path, pcrs)[0] == build / "application.eif"
    edited = {**pcrs, "PCR0": "dd" * 48}  # not what the build beside it measured: its EIF explains nothing
    assert _expected_eif(str(build / "measurements.json"), None, tmp_path, edited) == (None, {"measurements": pcrs,
                                                                                               "epoch": 1})
    lone = tmp_path / "measurements.json"
    lone.write_text(json.dumps({"Measurements": pcrs}))
    assert _expected_eif(str(lone), None, tmp_path, pcrs) == (None, None)
    assert pcr_reasons(["PCR0", "PCR2"]) == ["PCR2 differs: another customer ramdisk — the app image's files, its cmd "
                                             "or env, the manifest or odyn"]
    assert pcr_reasons(["PCR0", "PCR1"])[0].startswith("PCR1 differs: another kernel")
    assert pcr_reasons(["PCR0"]) == ["only PCR0 differs: the EIF's sections are the same parts put together "
                                     "differently"]


def test_the_lock_pins_inputs_and_a_changed_input_is_refused_until_updated(monorepo: Path, cli) -> None:  # type: ignore[no-untyped-def]
    manifest = str(monorepo / "services" / "gamma" / "enclaver.yaml")
    cache = str(monorepo / "cache")
    result = cli("lock", "-f", manifest, "--cache-dir", cache, "--json")
    assert result.code == 0, result.stderr
    lock = json.loads((monorepo / "services" / "gamma" / "enclaver.lock").read_text())
    assert set(lock) == {"lockVersion", "app", "odyn", "blobs", "sleeve"}  # the default runtime image too
    assert doit(monorepo, "build:gamma").returncode == 0
    assert summary(monorepo, "gamma")["inputs"]["app"]["digest"] == lock["app"]["digest"]  # type: ignore[index]

    make_app(monorepo / "services" / "gamma", "#!/bin/sh\necho other\n")
    refused = doit(monorepo, "build:gamma")
    assert refused.returncode != 0 and "no longer match enclaver.lock" in refused.stdout + refused.stderr
    stale = cli("lock", "-f", manifest, "--cache-dir", cache)
    assert stale.code == 1 and "app: the lock pins" in stale.stderr
    assert cli("lock", "-f", manifest, "--cache-dir", cache, "--update").code == 0
    assert doit(monorepo, "build:gamma").returncode == 0


def test_doit_verify_proves_a_build_reproduces(monorepo: Path) -> None:
    result = doit(monorepo, "verify:beta")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced: beta rebuilds to the same PCR0, PCR1, PCR2" in result.stdout


def test_doit_clean_removes_the_rule_sets_outputs_and_keeps_the_store(monorepo: Path) -> None:
    """`doit clean` removed nothing. Now each step removes what it wrote under cache/out/ and the
    shared store stays; the next build brings the outputs back."""
    assert doit(monorepo, "build:alpha", "build:beta").returncode == 0
    out = monorepo / "cache" / "out"
    index = (monorepo / "cache" / "index.json").read_bytes()
    entry = (out / "alpha" / "latest").resolve()
    assert (entry / "application.eif").is_file()

    one = doit(monorepo, "clean", "build:alpha")
    assert one.returncode == 0, one.stdout + one.stderr
    assert not (out / "alpha").exists() and (out / "beta" / "latest" / "build.json").is_file()
    assert (monorepo / "cache" / "index.json").read_bytes() == index  # the store is not touched

    eif_only = doit(monorepo, "clean", "eif:beta")
    assert eif_only.returncode == 0
    assert (out / "beta" / "resolved.json").is_file() and not (out / "beta" / "latest").exists()

    rebuilt = doit(monorepo, "build:alpha", "build:beta")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert ran(rebuilt.stdout, "eif:alpha") and ran(rebuilt.stdout, "eif:beta")
    assert (out / "alpha" / "latest").resolve() == entry  # same inputs, same key

    everything = doit(monorepo, "clean", "-a")
    assert everything.returncode == 0
    assert not any((out / name).exists() for name in NAMES) and not (out / "odyn").exists()
    assert (monorepo / "cache" / "blobs").is_dir()


def test_a_dirty_tree_is_labelled_and_a_clean_one_gives_back_the_same_release_image(monorepo: Path) -> None:
    """`<commit>+dirty` while a tracked file differs; committed or reverted, the clean label and so
    the clean release image come back (the label is part of what the release image is made of). A
    local `origin` gives no source label: host paths never reach an image."""
    from enclaver_rules.oci.model import ImageConfig, Manifest

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(monorepo), "-c", "user.name=t", "-c", "user.email=t@example.test",
                               *args], check=True, capture_output=True, text=True).stdout.strip()

    def labels() -> dict[str, str]:
        store = Store(monorepo / "cache")
        image = store.manifest(Digest.parse(str(summary(monorepo, "alpha")["release_image"])))
        assert isinstance(image, Manifest)
        return ImageConfig.parse(store.read(image.config.digest), "release config").labels

    git("init", "-q")
    git("remote", "add", "origin", str(monorepo.parent / "upstream-clone"))  # a local path
    (monorepo / ".gitignore").write_text("/cache/\n__pycache__/\n")
    (monorepo / "NOTES").write_text("one\n")
    git("add", "-A")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert doit(monorepo, "build:alpha").returncode == 0
    clean = summary(monorepo, "alpha")
    assert labels()["org.opencontainers.image.revision"] == head
    assert "org.opencontainers.image.source" not in labels()
    assert str(monorepo.parent) not in json.dumps(labels())

    (monorepo / "NOTES").write_text("two\n")  # a tracked change outside the enclave's directory
    dirty = doit(monorepo, "build:alpha")
    assert dirty.returncode == 0 and ran(dirty.stdout, "release:alpha") and not ran(dirty.stdout, "eif:alpha")
    assert labels()["org.opencontainers.image.revision"] == head + "+dirty"
    assert summary(monorepo, "alpha")["key"] == clean["key"]  # same EIF: only the label moved
    assert summary(monorepo, "alpha")["release_image"] != clean["release_image"]

    (monorepo / "NOTES").write_text("one\n")  # clean again: the very same release image
    back = doit(monorepo, "build:alpha")
    assert back.returncode == 0 and ran(back.stdout, "release:alpha")
    assert summary(monorepo, "alpha")["release_image"] == clean["release_image"]
    assert labels()["org.opencontainers.image.revision"] == head


@pytest.mark.services
def test_push_asks_the_registry_and_pushes_again_what_it_lost(monorepo: Path, registry) -> None:  # type: ignore[no-untyped-def]
    """pushed.json is not the registry: a push is up to date only while the registry serves the
    image at its target. Up to date means no write at all; a lost image is pushed again."""
    import urllib.request

    from enclaver_rules.oci.registry import Registry

    manifest = monorepo / "services" / "alpha" / "enclaver.yaml"
    manifest.write_text(manifest.read_text().replace("example.test/alpha:release", f"{registry.address}/lost/alpha:release"))
    first = doit(monorepo, "push:alpha", env=KMS)
    assert first.returncode == 0 and ran(first.stdout, "push:alpha"), first.stdout + first.stderr
    pushed = monorepo / "cache" / "out" / "alpha" / "latest" / "pushed.json"
    digest = json.loads(pushed.read_text())["digest"]

    def storage() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in (registry.root / "data").rglob("*") if p.is_file()}

    before, record = storage(), pushed.stat().st_mtime_ns
    again = doit(monorepo, "push:alpha", env=KMS)
    assert again.returncode == 0 and not ran(again.stdout, "push:alpha"), again.stdout
    assert storage() == before and pushed.stat().st_mtime_ns == record  # asked, wrote nothing

    deleted = urllib.request.urlopen(urllib.request.Request(f"{registry.url}/v2/lost/alpha/manifests/{digest}",
                                                            method="DELETE"), timeout=10)
    assert deleted.status == 202
    reg = Registry(registry.address)
    assert reg.head_manifest("lost/alpha", "release") is None and reg.head_manifest("lost/alpha", digest) is None
    lost = doit(monorepo, "push:alpha", env=KMS)
    assert lost.returncode == 0 and ran(lost.stdout, "push:alpha"), lost.stdout + lost.stderr
    assert str(reg.head_manifest("lost/alpha", "release")) == digest  # back where it belongs
    assert not ran(doit(monorepo, "push:alpha", env=KMS).stdout, "push:alpha")
