"""The no-fly-list guide failing on purpose (issue 19, item 3), with its own functions
(examples/no-fly-list/run.py) in the real Docker engine, against the real local KMS and moto's S3: each
failure is refused, and what the user sees on `enclaver run`'s stdout and stderr names the cause.

1. egress to a name the manifest does not allow: `enclaver run` refuses the --sim-host mapping up front;
   without it odyn's egress proxy refuses the app's request and its log line names the destination and
   the policy (the app, an AWS SDK, shows only "403 Forbidden");
2. the app rebuilt with one changed byte: a new PCR0, which the first build's key policy refuses (the
   app exits 3 with KMS's AccessDeniedException), and `enclaver verify-reproduce` against the first
   build's measurements.json (its EIF beside it) names the changed file;
3. a tampered release image (one answer of the app changed in the EIF, its CRC fixed): with its labels
   kept `enclaver run` refuses it (labels and EIF disagree); relabelled to match, `--verify-before-run`
   refuses it naming each PCR, expected vs got, before anything starts, and without the flag the enclave
   starts and KMS refuses its attestation; an EIF whose CRC was not fixed is refused by `enclaver run`
   itself; the release layer rewritten in place in the store is refused as a corrupt blob;
4. `--debug-mode` against the production key policy: `enclaver run` warns up front that the all-zero
   PCRs will be refused, and KMS refuses.

One build (module-scoped) serves every case; a key under the first build's policy is provisioned once
and shown to admit that build, so each refusal is the change's doing. Never skipped: without Docker,
mmdebstrap or moto the fixtures fail with the reason."""

from __future__ import annotations

import json
import mmap
import shutil
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclaver_rules.eif.format import HEADER_SIZE
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.layer import Entry, Layer, write_layer
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.store import Store
from enclaver_rules.rules.release import RELEASE_EIF, RELEASE_MANIFEST, RELEASE_MEASUREMENTS
from enclaver_rules.runtime.runnable import eif_facts
from guide_helpers import checkout, guide, simulator_containers
from services import Dockerd, free_port

pytestmark = pytest.mark.services

AS_BUILT = "enclaver-examples/no-fly-list:as-built"  # the first build's release (a rebuild moves :sim)
TAMPERED = "enclaver-examples/no-fly-list:tampered"  # the EIF changed, the labels kept
RELABELLED = "enclaver-examples/no-fly-list:relabelled"  # … and the labels made to agree with it
ANSWER = b"{asked} is on the no-fly list and CAN NOT BOARD!"  # in the app, in the EIF's customer ramdisk
FORGED = b"{asked} is on the no-fly list and can board now!"  # what the tamperer makes it say
WAIT = 180.0  # for a run that should end by itself


@pytest.fixture(scope="module")
def built(template: Path, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    yield checkout(template, dockerd, tmp_path_factory.mktemp("guide-failures") / "repo")


@pytest.fixture(scope="module")
def s3(built: tuple[Any, Path]) -> Iterator[tuple[str, int]]:
    with guide.s3_server(built[0].work, built[0].env) as server:
        yield server


@pytest.fixture(scope="module")
def production(built: tuple[Any, Path], s3: tuple[str, int], dockerd: Dockerd) -> dict[str, Any]:
    """The guide's steps 2–3 for the first build (its production key policy, a key, the sealed list), and
    the control: that build, run as the guide runs it, gets the data key and answers."""
    the_guide, build_dir = built
    policy = the_guide.key_policy(build_dir)
    the_guide.provision(policy, s3[0], guide.read_names())
    with the_guide.enclave(build_dir, s3[1], free_port()) as enclave:
        enclave.wait_serving()
        assert enclave.ask("Big Bird") == "Big Bird is on the no-fly list and CAN NOT BOARD!"
    assert enclave.code == 109, enclave.output
    assert not simulator_containers(dockerd)
    return policy


def measurements(build_dir: Path) -> dict[str, str]:
    return dict(json.loads((build_dir / "measurements.json").read_text())["Measurements"])


def run_to_the_end(the_guide: Any, target: Path | str, s3_port: int | None, extra: tuple[str, ...] = ()) -> Any:
    """`enclaver run --simulate TARGET …` as the guide runs it, until it ends by itself."""
    with the_guide.enclave(target, s3_port, free_port(), extra) as enclave:
        enclave.wait(WAIT)
    print(f"$ enclaver run --simulate {target} {' '.join(extra)}\n{enclave.output}")  # shown on failure (or with -s)
    return enclave


def kms_refusal(enclave: Any) -> str:
    """The app's line saying KMS refused the data key, checked to name the cause."""
    refusal = next((line for line in enclave.stdout if "KMS refused the data key" in line), "")
    assert "AccessDeniedException" in refusal and "explicit deny in a resource-based policy" in refusal, enclave.output
    assert "kms:RecipientAttestation conditions (PCR0)" in refusal, enclave.output
    assert enclave.code == 3 and "enclave: exited code 3" in enclave.stderr and enclave.stderr[-1] == "exit code 3"
    return refusal


# 1. egress ---------------------------------------------------------------------------------------------


def test_egress_to_a_name_the_manifest_does_not_allow_is_refused_naming_it(
        built: tuple[Any, Path], s3: tuple[str, int], production: dict[str, Any], dockerd: Dockerd) -> None:
    """The manifest without its S3 name (a plausible mistake): the app's NO_FLY_LIST_S3_ENDPOINT,
    http://s3.sim.internal, is a name the manifest does not allow."""
    the_guide, _ = built
    sim = (the_guide.repo / guide.MANIFEST).read_text()
    s3_rule = next(line for line in sim.splitlines(keepends=True) if line.strip().startswith("- s3.sim.internal"))
    variant = (sim.replace(s3_rule, "").replace("name: no-fly-list-sim\n", "name: no-fly-list-no-s3\n")
               .replace('target: "enclaver-examples/no-fly-list:sim"', 'target: "enclaver-examples/no-fly-list:no-s3"'))
    assert variant.count("no-s3") == 2 and "s3.sim.internal" not in variant.split("egress:")[1].split("ingress:")[0]
    (the_guide.repo / "examples" / "no-fly-list" / "no-s3.yaml").write_text(variant)
    no_s3 = the_guide.build("examples/no-fly-list/no-s3.yaml")

    # the guide's own run command maps s3.sim.internal: refused before anything starts
    refused = run_to_the_end(the_guide, no_s3, s3[1])
    assert refused.code == 2, refused.output
    assert ("error: --sim-host: --sim-host s3.sim.internal: the manifest's egress policy does not allow "
            "s3.sim.internal — allow it under egress.allow, or drop the mapping") in refused.stderr, refused.output
    assert not refused.stdout and not any(line.startswith(("sim-kms", "simulating")) for line in refused.stderr)

    # without the mapping the enclave starts, and the app's request meets odyn's egress proxy
    fetched_before = (the_guide.work / "moto.log").read_text().count("GET /no-fly-list/")
    enclave = run_to_the_end(the_guide, no_s3, None)
    assert enclave.code == 4, enclave.output  # the app's NO_ENVELOPE
    assert ("odyn: egress proxy: refused (403 Forbidden) s3.sim.internal:80 is denied by the enclave's egress policy "
            "(egress in enclaver.yaml): no allow rule matches (default deny)") in enclave.stdout, enclave.output
    assert ("no-fly-list: cannot fetch the envelope s3://no-fly-list/no-fly-list.json at http://s3.sim.internal: "
            "An error occurred (403) when calling the GetObject operation: Forbidden") in enclave.stdout, enclave.output
    assert sum("odyn: egress proxy: refused" in line for line in enclave.stdout) == 1  # boto3 retried: one line
    assert "enclave: exited code 4" in enclave.stderr and enclave.stderr[-1] == "exit code 4"
    assert (the_guide.work / "moto.log").read_text().count("GET /no-fly-list/") == fetched_before  # nothing left
    assert not simulator_containers(dockerd)


# 2. a changed app, the old key policy --------------------------------------------------------------------


def test_a_rebuilt_app_is_refused_by_the_old_key_policy_and_verify_reproduce_names_the_file(
        built: tuple[Any, Path], s3: tuple[str, int], production: dict[str, Any], dockerd: Dockerd) -> None:
    the_guide, build_dir = built
    app = the_guide.repo / "examples" / "no-fly-list" / "app" / "no_fly_list.py"
    source = app.read_bytes()
    assert source.count(ANSWER + b'"\n') == 1
    app.write_bytes(source.replace(ANSWER + b'"\n', ANSWER[:-1] + b'."\n'))  # one byte: "!" → "."
    rebuilt = the_guide.build()
    before, after = measurements(build_dir), measurements(rebuilt)
    assert rebuilt != build_dir and after["PCR0"] != before["PCR0"] and after["PCR2"] != before["PCR2"]
    assert after["PCR1"] == before["PCR1"]  # the same kernel and blob set
    assert after["PCR0"] not in json.dumps(production)

    enclave = run_to_the_end(the_guide, rebuilt, s3[1])
    kms_refusal(enclave)
    assert f"PCR0 {after['PCR0'][:16]}…" in next(line for line in enclave.stderr if line.startswith("simulating"))
    assert not simulator_containers(dockerd)

    # the old measurements, where the first build left them (the EIF beside them is opened; a lone
    # measurements.json gets what its PCRs cover instead: tests/test_build_pipeline.py)
    old = build_dir / "measurements.json"
    result = subprocess.run([*guide.ENCLAVER, "verify-reproduce", "-f", guide.MANIFEST, str(old)],
                            cwd=the_guide.repo, env=the_guide.env, capture_output=True, text=True, timeout=1800)
    print(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"NOT reproduced: PCR0, PCR2 differ (read from {old})",
        "no PCR (metadata only): the metadata section differs",
        "PCR0, PCR2 (customer ramdisk: the image's root file system, cmd and env): 1 entry differs",
        result.stdout.splitlines()[-1]], result.stdout
    assert result.stdout.splitlines()[-1].startswith(
        "  rootfs/app/no_fly_list.py: content differs (9639 → 9639 bytes, sha256 "), result.stdout


# 3. a tampered release image -----------------------------------------------------------------------------


def _fix_crc(eif: Path) -> None:
    """What a tamperer does next: the CRC32 over the header's first 544 bytes and all that follows it."""
    with open(eif, "r+b") as f:
        header = f.read(HEADER_SIZE)
        crc = zlib.crc32(header[:HEADER_SIZE - 4])
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
        f.seek(HEADER_SIZE - 4)
        f.write(crc.to_bytes(4, "big"))


def _forge(eif: Path, into: Path) -> None:
    """The EIF with the app's "CAN NOT BOARD!" answer changed, in place in its customer ramdisk."""
    shutil.copyfile(eif, into)
    with open(into, "r+b") as f, mmap.mmap(f.fileno(), 0) as data:
        at = data.find(ANSWER)
        assert at > 0 and data.find(ANSWER, at + 1) == -1
        data[at:at + len(FORGED)] = FORGED


def _tampered_layer(store: Store, release: Digest, eif: Path, epoch: int, work: Path) -> Layer:
    """The release image's last layer (/enclave) with `eif` in it instead, into the store (its file kept
    in `work` too)."""
    node = store.manifest(release)
    kept = {}
    for path in (RELEASE_MANIFEST, RELEASE_MEASUREMENTS):
        with open(work / Path(path).name, "w+b") as f:
            assert store.copy_file(node, path, f)
            f.seek(0)
            kept[path] = f.read()
    with open(work / "layer.tar.gz", "wb") as f:
        layer = write_layer([Entry.from_file(RELEASE_EIF, eif, 0o644),
                             *(Entry.file(path, data, 0o644) for path, data in kept.items())], f, mtime=epoch)
    with open(work / "layer.tar.gz", "rb") as f:
        store.put_stream(f, layer.digest, layer.size)
    return layer


def _release_with(store: Store, release: Digest, layer: Layer, name: str, pcrs: dict[str, str] | None = None) -> Digest:
    """A copy of the release image with `layer` as its last, tagged `name`; everything else kept, its
    PCR labels (and annotations) too unless `pcrs` relabels it. Its digests are its own: the store cannot tell."""
    manifest = json.loads(store.read(release))
    config = json.loads(store.read(Digest.parse(manifest["config"]["digest"])))
    config["rootfs"]["diff_ids"][-1] = str(layer.diff_id)
    for key, value in (pcrs or {}).items():
        label = f"dev.enclaver.{key.lower()}"
        assert config["config"]["Labels"][label] and manifest["annotations"][label]
        config["config"]["Labels"][label] = manifest["annotations"][label] = value
    config_bytes = canonical_json(config)
    manifest["config"] = {**manifest["config"], "digest": str(Digest.of(config_bytes)), "size": len(config_bytes)}
    manifest["layers"][-1] = {**manifest["layers"][-1], "digest": str(layer.digest), "size": layer.size}
    manifest_bytes = canonical_json(manifest)
    store.put_bytes(config_bytes)
    digest = store.put_bytes(manifest_bytes)
    store.tag(name, Descriptor(mt.OCI_MANIFEST, digest, len(manifest_bytes)))
    return digest


def _refused_up_front(enclave: Any) -> str:
    """`enclaver run` ended with exit code 1 before starting anything: its error line."""
    assert enclave.code == 1, enclave.output
    assert not enclave.stdout and not any(line.startswith(("sim-", "simulating", "enclave:")) for line in enclave.stderr)
    said = "\n".join(enclave.stderr)
    assert said.startswith("error: ") and "Traceback" not in said, said
    return said


def test_a_tampered_release_image_is_refused(built: tuple[Any, Path], s3: tuple[str, int],
                                            production: dict[str, Any], dockerd: Dockerd, tmp_path: Path) -> None:
    the_guide, build_dir = built
    store = Store(the_guide.repo / "cache")
    record = json.loads((build_dir / "build.json").read_text())
    release = Digest.parse(record["release_image"])
    store.tag(AS_BUILT, Descriptor(mt.OCI_MANIFEST, release, store.path(release).stat().st_size))
    expected = measurements(build_dir)
    forged = tmp_path / "forged.eif"
    _forge(build_dir / "application.eif", forged)
    naive = tmp_path / "naive.eif"  # the same change, the CRC left as it was
    shutil.copyfile(forged, naive)
    _fix_crc(forged)
    got = eif_facts(forged)[0]
    assert got["PCR0"] != expected["PCR0"] and got["PCR2"] != expected["PCR2"] and got["PCR1"] == expected["PCR1"]
    layer = _tampered_layer(store, release, forged, record["epoch"], tmp_path)
    _release_with(store, release, layer, TAMPERED)  # its labels still claim the build's PCRs
    _release_with(store, release, layer, RELABELLED, got)  # its labels made to agree with its EIF
    verify = ("--verify-before-run", str(build_dir / "measurements.json"))

    # the labels kept: `enclaver run` sees they are not what the EIF measures (as `trust --recompute` does)
    said = _refused_up_front(run_to_the_end(the_guide, TAMPERED, s3[1]))
    assert said == (f"error: {TAMPERED}: its labels and its EIF disagree: PCR0 labelled {expected['PCR0']} but "
                    f"measured {got['PCR0']}; PCR2 labelled {expected['PCR2']} but measured {got['PCR2']} — do not "
                    "run it: it was relabelled or its EIF replaced after it was built; pull it again from a registry "
                    "you trust, or build it again"), said
    recomputed = subprocess.run([*guide.ENCLAVER, "trust", TAMPERED, "--recompute"], cwd=the_guide.repo,
                                env=the_guide.env, capture_output=True, text=True, timeout=300)
    print(recomputed.stderr)
    assert recomputed.returncode == 1 and "its labels and its EIF disagree: PCR0 labelled" in recomputed.stderr, recomputed.stderr

    # relabelled too: --verify-before-run refuses it before anything starts, each PCR named, expected vs got
    said = _refused_up_front(run_to_the_end(the_guide, RELABELLED, s3[1], verify))
    assert said == (f"error: {RELABELLED}: the EIF's measurements do not match {build_dir / 'measurements.json'}: "
                    f"PCR0 expected {expected['PCR0']} got {got['PCR0']}; PCR2 expected {expected['PCR2']} got "
                    f"{got['PCR2']} — this is not the enclave those measurements describe: do not run it"), said
    # the control: the release as built passes the same check (then -p …:9999, not an ingress port, stops it)
    passed = subprocess.run([*guide.ENCLAVER, "run", "--simulate", AS_BUILT, *verify, "-p", "127.0.0.1:1:9999"],
                            cwd=the_guide.repo, env=the_guide.env, capture_output=True, text=True, timeout=300)
    assert passed.returncode == 2 and "measurements match" in passed.stderr and "9999" in passed.stderr, passed.stderr

    # relabelled, without the flag: it starts (the simulator runs the enclave image, the NSM attests the EIF's
    # PCRs) and KMS refuses the tampered PCR0: the list stays sealed
    enclave = run_to_the_end(the_guide, RELABELLED, s3[1])
    kms_refusal(enclave)
    assert f"simulating no-fly-list-sim ({RELABELLED}): PCR0 {got['PCR0'][:16]}…" in " ".join(enclave.stderr)
    assert not simulator_containers(dockerd)

    # the change without a new CRC: `enclaver run` refuses the EIF itself
    said = _refused_up_front(run_to_the_end(the_guide, naive, s3[1]))
    assert said == (f"error: {naive}: the EIF's CRC32 does not match its contents: it was damaged or changed after it "
                    "was built — do not run it: build it again, or pull the release image again from its registry")

    # the release layer rewritten in place in the store: its bytes no longer match its digest
    original = Digest.parse(json.loads(store.read(release))["layers"][-1]["digest"])
    blob, kept = store.path(original), tmp_path / "layer.kept"
    blob.rename(kept)
    try:
        shutil.copyfile(tmp_path / "layer.tar.gz", blob)  # the tampered layer's bytes under the original's name
        said = _refused_up_front(run_to_the_end(the_guide, AS_BUILT, s3[1]))
        assert said.startswith(f"error: {AS_BUILT}: a layer of the release image (read for {RELEASE_EIF}): {original} "
                               f"in the store at {store.root} is corrupt: its file {blob} holds {layer.size} bytes "
                               f"whose digest is {layer.digest} — it was moved to "), said
        assert said.endswith(" and is not used; run `enclaver cache verify` to check the rest of the store, then pull "
                             "the image again (a build fetches it again from its registry)"), said
        assert not blob.exists() and store.quarantined()  # set aside, never used
    finally:
        blob.unlink(missing_ok=True)
        kept.rename(blob)
    assert store.intact(original)
    assert not simulator_containers(dockerd)


# 4. debug mode against the production policy ----------------------------------------------------------------


def test_a_debug_mode_enclave_is_warned_about_and_refused_by_the_production_policy(
        built: tuple[Any, Path], s3: tuple[str, int], production: dict[str, Any], dockerd: Dockerd) -> None:
    the_guide, build_dir = built
    pcr0 = measurements(build_dir)["PCR0"]
    enclave = run_to_the_end(the_guide, build_dir, s3[1], ("--debug-mode",))
    kms_refusal(enclave)
    assert enclave.stderr[0] == (
        "warning: --debug-mode: the enclave's attestation documents carry all-zero PCR0, PCR1, PCR2 and PCR8, not "
        f"this build's (PCR0 {pcr0[:16]}…): a KMS key policy that pins its PCRs (as `enclaver trust --kms-policy` "
        "writes) refuses its KMS proxy's requests, and any verifier expecting its measurements refuses it; debug "
        "mode is for the console, never for secrets"), enclave.output
    assert any(line.startswith("simulating no-fly-list-sim") and "(debug mode: PCRs zero)" in line
               for line in enclave.stderr), enclave.output
    assert not simulator_containers(dockerd)
