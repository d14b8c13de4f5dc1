"""Tasks `resolve:<name>` and `build:<name>`: from enclaver.yaml to an enclave image, an EIF, its
measurements and a release image, content-addressed in `cache/out/<name>/<key>/`.

`resolve` turns every input into a digest (the app image, the odyn image, the kernel blob set) and
writes `out/<name>/resolved.json`, rewriting it only when something changed, so doit re-runs
`build` exactly when an input did. `build` derives its key from those digests, the manifest's
bytes, the signing certificate, SOURCE_DATE_EPOCH and enclaver's version; a key that is already
complete is a cache hit (its EIF is re-hashed first, so a tampered entry is rebuilt, not used).
A build is assembled in a temporary directory and renamed into place, so `kill -9` at any point
leaves either nothing or a complete entry; `out/<name>/latest` then points at it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from enclaver_rules import __version__
from enclaver_rules.errors import EnclaverError, InvalidInput, OperationFailed
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import Descriptor, Manifest
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.store import Store, atomic_write


def reported(action: Callable[..., Any]) -> Callable[..., Any]:
    """An enclaver error fails the task with its message (file, field, fix), not a traceback.
    functools.wraps keeps the name, so doit can still pickle the action for `-n`."""
    @functools.wraps(action)
    def run(*args: Any) -> Any:
        try:
            return action(*args)
        except EnclaverError as e:
            return TaskFailed(str(e))

    return run


RESOLVED = "resolved.json"
BUILD = "build.json"
ODYN_IN_IMAGE = "usr/local/bin/odyn"  # upstream's path in an odyn image
RELEASE_EIF = "/enclave/application.eif"
RELEASE_MANIFEST = "/enclave/enclaver.yaml"
RELEASE_MEASUREMENTS = "/enclave/measurements.json"


def out_dir(cache_dir: str, name: str) -> Path:
    return Path(cache_dir) / "out" / name


def _relative_to(manifest_path: str, ref: str) -> str:
    """`oci:` paths in a manifest are relative to the manifest's directory, like its other paths."""
    if ref.startswith("oci:") and not ref[4:].startswith("/"):
        return "oci:" + str(Path(manifest_path).resolve().parent / ref[4:])
    return ref


def _write_if_changed(path: Path, data: bytes) -> bool:
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return True


def _build_settings(manifest_path: str) -> tuple[Any, dict[str, Any]]:
    from enclaver_rules.manifest import resolve as resolve_config

    config = resolve_config(manifest_path, {}, os.environ)
    manifest = config.require_manifest()
    values: dict[str, Any] = {}
    base = Path(manifest_path).resolve().parent
    for v in config.values:
        values[v.setting.key] = v.value
        if v.setting.key == "build.blobs" and v.origin == "file" and not Path(str(v.value)).is_absolute():
            values[v.setting.key] = str(base / str(v.value))
    return manifest, values


LOCK = "enclaver.lock"


def lock_path(manifest_path: str) -> Path:
    return Path(manifest_path).resolve().parent / LOCK


def lock_document(resolved: dict[str, Any]) -> dict[str, Any]:
    """What `enclaver.lock` pins: every input's digest (the manifest itself is in git)."""
    return {"lockVersion": 1,
            "app": {"ref": resolved["app"]["ref"], "digest": resolved["app"]["digest"]},
            "odyn": {"ref": resolved["odyn"]["ref"], "digest": resolved["odyn"]["digest"]},
            "blobs": {"arch": resolved["blobs"]["arch"], "digest": resolved["blobs"]["digest"]}}


def lock_differences(locked: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    now = lock_document(resolved)
    return [f"{k}: the lock pins {locked.get(k, {}).get('digest')}, it is now {now[k]['digest']}"
            for k in ("app", "odyn", "blobs") if locked.get(k, {}).get("digest") != now[k]["digest"]]


def _pinned(ref: str, digest: str) -> str:
    """A registry reference pinned to the locked digest (served from the store when present);
    other transports (oci:, docker-archive:, docker-daemon:) are checked after resolution instead."""
    if ref.startswith(("oci:", "docker-archive:", "docker-daemon:")) or "@" in ref:
        return ref
    return f"{ref.removeprefix('docker://')}@{digest}"


@reported
def resolve_enclave(manifest_path: str, name: str, cache_dir: str, enforce_lock: bool = True) -> dict[str, Any]:
    """Every input as a digest, in `out/<name>/resolved.json`. With an `enclaver.lock` beside the
    manifest, registry images are fetched by their locked digests and every input must match it."""
    from enclaver_rules.eif.blobs import load_blobs
    from enclaver_rules.eif.build import image_arch
    from enclaver_rules.oci.resolve import Sources, resolve
    from enclaver_rules.oci.transfer import load_stored
    from enclaver_rules.odyn_image.image import DEFAULT_TAG
    from enclaver_rules.rules.odyn import record_path

    manifest, values = _build_settings(manifest_path)
    raw = Path(manifest_path).read_bytes()
    store = Store(cache_dir).init()
    sources = Sources(store)
    locked: dict[str, Any] | None = None
    if enforce_lock and lock_path(manifest_path).is_file():
        try:
            locked = json.loads(lock_path(manifest_path).read_text())
            assert isinstance(locked, dict)
        except (ValueError, AssertionError):
            raise InvalidInput("not a JSON lock file", file=str(lock_path(manifest_path)),
                               fix="write it again with `enclaver lock --update`") from None
    app_ref = manifest.sources.app
    if locked and locked.get("app", {}).get("ref") == app_ref:
        app_ref = _pinned(app_ref, locked["app"]["digest"])
    app = resolve(_relative_to(manifest_path, app_ref), sources)
    if manifest.sources.odyn:
        odyn = resolve(_relative_to(manifest_path, manifest.sources.odyn), sources)
    else:
        try:
            record = json.loads(record_path(cache_dir).read_text())
        except OSError:
            raise OperationFailed("the default odyn image has not been built", fix="run `doit odyn_image`") from None
        odyn = load_stored(store, DEFAULT_TAG, Digest.parse(record["digest"]))
    arch = image_arch(app)
    blobs = load_blobs(str(values.get("build.blobs")), arch)
    doc = {
        "manifest": {"path": manifest_path, "sha256": hashlib.sha256(raw).hexdigest()},
        "app": {"ref": manifest.sources.app, "name": app.name, "digest": str(app.digest)},
        "odyn": {"ref": manifest.sources.odyn or DEFAULT_TAG, "name": odyn.name, "digest": str(odyn.digest)},
        "blobs": {"path": str(blobs.root), "digest": str(blobs.digest), "arch": arch,
                  "development": blobs.development},
        "backend": values.get("build.backend") or "pure",
    }
    if locked is not None:
        stale = lock_differences(locked, doc)
        if stale:
            raise InvalidInput("the inputs no longer match enclaver.lock: " + "; ".join(stale),
                               file=str(lock_path(manifest_path)),
                               fix="if the change is intended, run `enclaver lock --update` and commit the lock")
    _write_if_changed(out_dir(cache_dir, name) / RESOLVED, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")
    return doc


@dataclass(frozen=True)
class Inputs:
    manifest_raw: bytes
    resolved: dict[str, Any]
    signing: tuple[Path, Path] | None
    epoch: int

    def key(self) -> str:
        parts = {
            "enclaver": __version__,
            "manifest": hashlib.sha256(self.manifest_raw).hexdigest(),
            "app": self.resolved["app"]["digest"],
            "odyn": self.resolved["odyn"]["digest"],
            "blobs": self.resolved["blobs"]["digest"],
            "signing": hashlib.sha256(self.signing[0].read_bytes()).hexdigest() if self.signing else None,
            "epoch": self.epoch,
        }
        return hashlib.sha256(canonical_json(parts)).hexdigest()[:32]


def _odyn_binary(store: Store, image_digest: Digest, where: str) -> bytes:
    node = store.manifest(image_digest)
    assert isinstance(node, Manifest)
    binary = io.BytesIO()
    if not store.copy_file(node, ODYN_IN_IMAGE, binary):
        raise InvalidInput(f"{where} has no /{ODYN_IN_IMAGE}", field="sources.odyn",
                           fix="name an odyn image (upstream's layout: the binary at /usr/local/bin/odyn)")
    return binary.getvalue()


@reported
def build_enclave(manifest_path: str, name: str, cache_dir: str) -> dict[str, Any]:
    """layer → EIF → measurements → release image, into `out/<name>/<key>/` (a cache hit if complete)."""
    from enclaver_rules.eif.blobs import load_blobs
    from enclaver_rules.eif.build import build_eif
    from enclaver_rules.eif.sign import Signer
    from enclaver_rules.oci import enclave
    from enclaver_rules.oci.layer import Entry, source_date_epoch, write_layer
    from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image, rfc3339
    from enclaver_rules.oci.transfer import load_stored

    manifest, _ = _build_settings(manifest_path)
    raw = Path(manifest_path).read_bytes()
    out = out_dir(cache_dir, name)
    resolved = json.loads((out / RESOLVED).read_text())
    if resolved["manifest"]["sha256"] != hashlib.sha256(raw).hexdigest():
        raise OperationFailed(f"{manifest_path} changed after it was resolved", fix=f"run `doit resolve:{name}` again")
    base = Path(manifest_path).resolve().parent
    signing = ((base / manifest.signature.certificate, base / manifest.signature.key)
               if manifest.signature else None)
    inputs = Inputs(raw, resolved, signing, source_date_epoch())
    key = inputs.key()
    dest = out / key
    if dest.is_dir() and _intact(dest):
        _point_latest(out, key)
        return json.loads((dest / BUILD).read_text())  # type: ignore[no-any-return]
    if dest.exists():
        shutil.rmtree(dest)  # incomplete or tampered: rebuild it
    for stale in out.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed build
    work = out / f".tmp-{key}-{os.getpid()}"
    work.mkdir(parents=True)
    store = Store(cache_dir).init()
    app = load_stored(store, resolved["app"]["name"], Digest.parse(resolved["app"]["digest"]))
    odyn_bytes = _odyn_binary(store, Digest.parse(resolved["odyn"]["digest"]), resolved["odyn"]["ref"])
    epoch = inputs.epoch

    # 1. the enclave image: app + one layer (manifest, odyn), entrypoint → odyn -- app
    buf = io.BytesIO()
    layer = write_layer(enclave.layer_entries(raw, odyn_bytes), buf, mtime=epoch)
    store.put_bytes(buf.getvalue(), layer.digest)
    labels = {f"{enclave.LABEL}.manifest.sha256": hashlib.sha256(raw).hexdigest(),
              f"{enclave.LABEL}.app.digest": resolved["app"]["digest"],
              f"{enclave.LABEL}.odyn.digest": resolved["odyn"]["digest"]}
    edited = edit_image(app.manifest, app.config, layers=[layer], created=epoch, created_by="enclaver layer",
                        edit=enclave.config_edit(app.config, resolved["app"]["ref"], labels))
    enclave_tag = f"enclaver/{name}:enclave-{key[:16]}"
    store.keep_image(enclave_tag, edited)
    enclave_image = load_stored(store, enclave_tag, edited.manifest_digest)

    # 2. the EIF and its measurements
    arch = resolved["blobs"]["arch"]
    blobs = load_blobs(resolved["blobs"]["path"], arch, Digest.parse(resolved["blobs"]["digest"]))
    signer = Signer.load(*signing) if signing else None
    eif_path = work / "application.eif"
    result = build_eif(enclave_image, store, blobs, eif_path, epoch=epoch, image_name=manifest.target,
                       signer=signer, workdir=str(work))
    measurements = {"Measurements": {"HashAlgorithm": "Sha384 { ... }", **result.measurements.to_json()}}  # as nitro-cli
    measurements_bytes = json.dumps(measurements, indent=2).encode() + b"\n"
    (work / "measurements.json").write_bytes(measurements_bytes)

    # 3. the release image: EIF, manifest and measurements on the sleeve base (empty by default)
    layer_file = work / ".release-layer.tar.gz"  # streamed: the EIF is as large as the app
    with open(layer_file, "wb") as f:
        release_layer = write_layer([Entry.from_file(RELEASE_EIF, eif_path, 0o644),
                                     Entry.file(RELEASE_MANIFEST, raw, 0o644),
                                     Entry.file(RELEASE_MEASUREMENTS, measurements_bytes, 0o644)],
                                    f, mtime=epoch)
    with open(layer_file, "rb") as f:
        store.put_stream(f, release_layer.digest, release_layer.size, source="release layer")
    layer_file.unlink()
    eif_digest = Digest.of_file(eif_path)
    if manifest.sources.sleeve:
        raise InvalidInput("a sleeve base image is not supported yet", field="sources.sleeve",
                           fix="remove it: the release image is built on an empty base until the runtime image exists")
    base_manifest, base_config = empty_image(arch)
    pcrs = {k: v for k, v in result.measurements.to_json().items() if k.startswith("PCR")}
    release_labels = {
        "org.opencontainers.image.created": rfc3339(epoch),
        "org.opencontainers.image.title": manifest.name,
        f"{enclave.LABEL}.version": __version__,
        f"{enclave.LABEL}.app.digest": resolved["app"]["digest"],
        f"{enclave.LABEL}.odyn.digest": resolved["odyn"]["digest"],
        f"{enclave.LABEL}.blobs.digest": resolved["blobs"]["digest"],
        f"{enclave.LABEL}.blobs.development": str(resolved["blobs"]["development"]).lower(),
        **{f"{enclave.LABEL}.{k.lower()}": v for k, v in pcrs.items()},
    }
    released = edit_image(base_manifest, base_config, layers=[release_layer], created=epoch,
                          created_by="enclaver release", edit=ConfigEdit(labels=tuple(sorted(release_labels.items()))))
    store.keep_image(manifest.target, released)

    summary = {
        "name": name, "key": key, "target": manifest.target, "epoch": epoch,
        "enclave_image": str(edited.manifest_digest), "release_image": str(released.manifest_digest),
        "eif": {"file": "application.eif", "sha256": eif_digest.hex, "size": eif_path.stat().st_size},
        "measurements": pcrs, "development": resolved["blobs"]["development"],
        "inputs": {k: resolved[k] for k in ("app", "odyn", "blobs")},
    }
    st = eif_path.stat()  # inode and mtime survive the rename of the directory
    summary["eif"]["stat"] = [st.st_size, st.st_mtime_ns, st.st_ino]
    (work / BUILD).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(work, dest)
    _point_latest(out, key)
    return summary


def _intact(dest: Path, *, quick: bool = False) -> bool:
    """A complete entry whose EIF still has the digest it was recorded with. `quick` (doit's
    up-to-date check, every run) compares size, mtime and inode instead of re-hashing hundreds of
    MiB; a real build re-hashes before it reuses an entry."""
    try:
        summary = json.loads((dest / BUILD).read_text())
        if quick:
            st = (dest / summary["eif"]["file"]).stat()
            stamp = summary["eif"].get("stat")
            return bool(stamp == [st.st_size, st.st_mtime_ns, st.st_ino] and (dest / "measurements.json").is_file())
        eif = Digest.of_file(dest / summary["eif"]["file"])
        return bool(eif.hex == summary["eif"]["sha256"] and (dest / "measurements.json").is_file())
    except (OSError, ValueError, KeyError):
        return False


def _point_latest(out: Path, key: str) -> None:
    link = out / "latest"
    tmp = out / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(key, tmp)
    os.replace(tmp, link)  # atomic: readers see the old or the new entry, never none


def resolve_tasks(enclaves: list[Any], cache_dir: str, extra_deps: dict[str, list[str]] | None = None) -> Any:
    yield {"basename": "resolve", "name": None, "doc": "turn every enclave's inputs into digests"}
    for e in enclaves:
        yield {
            "basename": "resolve", "name": e.name, "doc": f"resolve the images and blob set of {e.path}",
            "actions": [(resolve_enclave, [e.path, e.name, cache_dir])],
            "file_dep": [e.path],
            "task_dep": [f"check:{e.name}", "odyn_image", *(extra_deps or {}).get(e.name, [])],
            "targets": [str(out_dir(cache_dir, e.name) / RESOLVED)],
            "uptodate": [False],  # a tag may have moved: always ask (a pinned input is a store lookup)
            "verbosity": 1,
        }


def _latest_intact(cache_dir: str, name: str) -> bool:
    return _intact(out_dir(cache_dir, name) / "latest", quick=True)


def build_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    yield {"basename": "build", "name": None, "doc": "build every enclave: enclave image, EIF, measurements, release image"}
    for e in enclaves:
        out = out_dir(cache_dir, e.name)
        yield {
            "basename": "build", "name": e.name, "doc": f"build {e.path}",
            "actions": [(build_enclave, [e.path, e.name, cache_dir])],
            "file_dep": [e.path, str(out / RESOLVED)],
            "targets": [str(out / "latest" / BUILD)],
            "uptodate": [(_latest_intact, [cache_dir, e.name])],
            "verbosity": 2,
        }


PLACEHOLDER_ACCOUNT = "000000000000"
POLICY = "kms-policy.json"


@reported
def write_policy(cache_dir: str, name: str) -> dict[str, Any]:
    """The KMS key policy for the latest build, beside its EIF. The account comes from
    ENC_KMS_ACCOUNT; without it the policy names 000000000000 and says so."""
    from enclaver_rules.policy import kms

    latest = (out_dir(cache_dir, name) / "latest").resolve()
    summary = json.loads((latest / BUILD).read_text())
    account = os.environ.get("ENC_KMS_ACCOUNT") or PLACEHOLDER_ACCOUNT
    trust = kms.Trust.for_account(account, os.environ.get("ENC_KMS_ADMIN"), os.environ.get("ENC_KMS_PRINCIPAL"),
                                  allow_debug=False)
    policy = kms.key_policy(summary["measurements"], trust)
    path = latest / POLICY
    atomic_write(path, json.dumps(policy, indent=2).encode() + b"\n")
    print(f"{name}: PCR0 {summary['measurements']['PCR0']}")
    print(f"{name}: PCR1 {summary['measurements']['PCR1']}")
    print(f"{name}: PCR2 {summary['measurements']['PCR2']}")
    if summary.get("development"):
        print(f"{name}: built with a development blob set: these PCRs are for trying the pipeline, not for AWS")
    print(f"{name}: KMS key policy written to {path}")
    if account == PLACEHOLDER_ACCOUNT:
        print(f"{name}: the policy names account {PLACEHOLDER_ACCOUNT}: set ENC_KMS_ACCOUNT (and ENC_KMS_PRINCIPAL)")
    return {"policy": str(path), "account": account}


def trust_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    yield {"basename": "trust", "name": None, "doc": "write every enclave's KMS key policy"}
    for e in enclaves:
        latest = out_dir(cache_dir, e.name) / "latest"
        yield {
            "basename": "trust", "name": e.name, "doc": f"KMS key policy for {e.path}",
            "actions": [(write_policy, [cache_dir, e.name])],
            "task_dep": [f"build:{e.name}"],
            "file_dep": [str(latest / BUILD)],
            "targets": [str(latest / POLICY)],
            "uptodate": [config_changed({k: os.environ.get(k) for k in
                                         ("ENC_KMS_ACCOUNT", "ENC_KMS_ADMIN", "ENC_KMS_PRINCIPAL")})],
            "verbosity": 2,
        }


PUSHED = "pushed.json"


@reported
def push_enclave(cache_dir: str, name: str) -> dict[str, Any]:
    """Push the latest release image to its `target`, then attach its measurements and KMS key
    policy as OCI referrers (the `sha256-<hex>` tag fallback where the registry has no referrers API)."""
    from enclaver_rules.oci import referrers
    from enclaver_rules.oci.reference import Reference
    from enclaver_rules.oci.registry import Registry
    from enclaver_rules.oci.transfer import load_stored, push

    latest = (out_dir(cache_dir, name) / "latest").resolve()
    summary = json.loads((latest / BUILD).read_text())
    target = Reference.parse(summary["target"])
    insecure = {h.strip() for h in os.environ.get("ENC_INSECURE_REGISTRY", "").split(",") if h.strip()}
    registry = Registry(target.registry, insecure=target.registry in insecure)
    store = Store(cache_dir)
    image = load_stored(store, summary["target"], Digest.parse(summary["release_image"]))
    digest = push(image, store, target, registry)
    subject = Descriptor(image.manifest.media_type, digest, len(image.manifest.raw))
    created = int(summary.get("epoch", 0))
    attached = []
    for kind, file in ((referrers.MEASUREMENTS, latest / "measurements.json"), (referrers.KMS_KEY_POLICY, latest / POLICY)):
        if file.is_file():
            result = referrers.attach(registry, target.repository, subject, kind.artifact_type,
                                      [kind.file(file.read_bytes())], created=created,
                                      annotations={"org.opencontainers.image.title": kind.filename})
            attached.append({"artifactType": kind.artifact_type, "digest": str(result.digest),
                             "discovery": result.discovery, "tag": result.tag})
    record = {"target": str(target), "digest": str(digest), "referrers": attached}
    atomic_write(latest / PUSHED, json.dumps(record, indent=2).encode() + b"\n")
    print(f"{name}: pushed {target} {digest}")
    for a in attached:
        where = f"listed by the fallback tag {a['tag']}" if a["discovery"] == "tag" else "listed by the registry"
        print(f"{name}: attached {a['artifactType']} {a['digest']} ({where})")
    return record


def push_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    yield {"basename": "push", "name": None, "doc": "push every enclave's release image with its measurements and policy"}
    for e in enclaves:
        latest = out_dir(cache_dir, e.name) / "latest"
        yield {
            "basename": "push", "name": e.name, "doc": f"push the release image of {e.path} to its target",
            "actions": [(push_enclave, [cache_dir, e.name])],
            "task_dep": [f"trust:{e.name}"],
            "file_dep": [str(latest / BUILD), str(latest / POLICY)],
            "targets": [str(latest / PUSHED)],
            "verbosity": 2,
        }


def verify_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    """`verify:<name>` for CI: rebuild from nothing in a temporary cache (odyn from source too) and
    fail unless the PCRs equal the latest build's. Always runs: that is its point."""
    import sys

    yield {"basename": "verify", "name": None, "doc": "prove every enclave's build reproduces bit for bit"}
    for e in enclaves:
        latest = out_dir(cache_dir, e.name) / "latest"
        yield {
            "basename": "verify", "name": e.name, "doc": f"rebuild {e.path} from nothing and compare the PCRs",
            "actions": [[sys.executable, "-m", "enclaver_rules.cli", "verify-reproduce", str(latest), "-f", e.path]],
            "task_dep": [f"build:{e.name}"],
            "uptodate": [False],
            "verbosity": 2,
        }
