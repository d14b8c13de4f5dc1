"""Task `resolve:<name>`: every input of an enclave as a digest, and `enclaver.lock`.

`resolve` turns the app image, the odyn image and the kernel blob set into digests and writes
`out/<name>/resolved.json`, rewriting it only when something changed, so doit re-runs the later
steps exactly when an input did. It always runs (a tag may have moved), so it is kept cheap when
nothing did: a pinned input is a store lookup; a local source (`oci:` layout, `docker-archive:`,
the blob set) whose files still have the stamps recorded in `out/<name>/stamps.json` when they were
last hashed is not read again; a registry tag costs one HEAD request while it names the digest it
was pulled at (`enclaver_rules.oci.stamps` says why a stamp may be trusted, and where the bytes are
verified instead: whenever a step reads them). With an `enclaver.lock` beside the manifest,
registry images are fetched by their locked digests and every input must match the lock.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.stamps import Stamps
from enclaver_rules.oci.store import Store
from enclaver_rules.rules.common import (
    RESOLVED,
    STAMPS,
    build_settings,
    out_dir,
    reported,
    signing_files,
    write_if_changed,
)


def _relative_to(manifest_path: str, ref: str) -> str:
    """`oci:` paths in a manifest are relative to the manifest's directory, like its other paths."""
    if ref.startswith("oci:") and not ref[4:].startswith("/"):
        return "oci:" + str(Path(manifest_path).resolve().parent / ref[4:])
    return ref


LOCK = "enclaver.lock"


def lock_path(manifest_path: str) -> Path:
    return Path(manifest_path).resolve().parent / LOCK


def lock_document(resolved: dict[str, Any]) -> dict[str, Any]:
    """What `enclaver.lock` pins: every input's digest (the manifest itself is in git)."""
    document = {"lockVersion": 1,
                "app": {"ref": resolved["app"]["ref"], "digest": resolved["app"]["digest"]},
                "odyn": {"ref": resolved["odyn"]["ref"], "digest": resolved["odyn"]["digest"]},
                "blobs": {"arch": resolved["blobs"]["arch"], "digest": resolved["blobs"]["digest"]}}
    if resolved.get("sleeve"):
        document["sleeve"] = {"ref": resolved["sleeve"]["ref"], "digest": resolved["sleeve"]["digest"]}
    return document


def lock_differences(locked: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    now = lock_document(resolved)
    return [f"{k}: the lock pins {(locked.get(k) or {}).get('digest')}, it is now {(now.get(k) or {}).get('digest')}"
            for k in ("app", "odyn", "blobs", "sleeve")
            if (locked.get(k) or {}).get("digest") != (now.get(k) or {}).get("digest")]


def _pinned(ref: str, digest: str) -> str:
    """A registry reference pinned to the locked digest (served from the store when present);
    other transports (oci:, docker-archive:, docker-daemon:) are checked after resolution instead."""
    if ref.startswith(("oci:", "docker-archive:", "docker-daemon:")) or "@" in ref:
        return ref
    return f"{ref.removeprefix('docker://')}@{digest}"


def _settings(manifest_path: str, manifest: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The effective settings later steps key on, ENC_* and SOURCE_DATE_EPOCH applied. Kept here
    because `resolve` always runs: a changed variable or certificate changes this record, and doit
    re-runs exactly the steps that depend on it."""
    from enclaver_rules.oci.layer import source_date_epoch

    signing = signing_files(manifest_path, manifest)
    if signing is not None:
        try:
            certificate = hashlib.sha256(signing[0].read_bytes()).hexdigest()
        except OSError as e:
            raise InvalidInput(f"cannot read the signing certificate: {e.strerror}", file=str(signing[0]),
                               field="signature.certificate", fix="give the path of a PEM certificate") from None
    backend = values.get("build.backend") or "pure"
    nitro_cli = None
    if backend == "nitro-cli":  # the image is a build tool: its ID goes into the EIF's key
        from enclaver_rules.eif.nitro_cli import DEFAULT_IMAGE
        from enclaver_rules.oci.engine import Engine

        engine = Engine()
        image = values.get("build.nitro_cli_image") or DEFAULT_IMAGE
        image_id = engine.image_id(image)
        if image_id is None:
            raise OperationFailed(f"the nitro-cli image {image} is not in the engine at {engine.host}",
                                  fix=f"docker pull {image}, or name another in build.nitro_cli_image")
        nitro_cli = {"image": image, "id": image_id}
    return {
        "target": manifest.target,
        "name": manifest.name,
        "epoch": source_date_epoch(),
        "backend": backend,
        "nitro_cli": nitro_cli,
        "signing": None if signing is None else {"certificate": str(signing[0]), "key": str(signing[1]),
                                                 "certificate_sha256": certificate},
    }


@reported
def resolve_enclave(manifest_path: str, name: str, cache_dir: str, enforce_lock: bool = True) -> dict[str, Any]:
    """Every input as a digest, in `out/<name>/resolved.json`. With an `enclaver.lock` beside the
    manifest, registry images are fetched by their locked digests and every input must match it."""
    from enclaver_rules.eif.blobs import image_arch, load_blobs_stamped
    from enclaver_rules.oci.resolve import Sources, resolve
    from enclaver_rules.oci.transfer import load_stored
    from enclaver_rules.odyn_image.image import DEFAULT_TAGS
    from enclaver_rules.odyn_image.runtime_image import DEFAULT_TAG as RUNTIME_TAG
    from enclaver_rules.rules.odyn import record_path

    manifest, values = build_settings(manifest_path)
    raw = Path(manifest_path).read_bytes()
    store = Store(cache_dir).init()
    stamps = Stamps(out_dir(cache_dir, name) / STAMPS)
    sources = Sources(store, stamps=stamps)
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
    app = resolve(_relative_to(manifest_path, app_ref), sources, file=manifest_path, field="sources.app")
    arch = image_arch(app)
    if manifest.sources.odyn:
        odyn = resolve(_relative_to(manifest_path, manifest.sources.odyn), sources, file=manifest_path,
                       field="sources.odyn")
        if image_arch(odyn) != arch:
            raise InvalidInput(f"the odyn image is {image_arch(odyn)} but the app is {arch}: odyn runs on the same "
                               "CPU as the app", field="sources.odyn", fix=f"name the {arch} build of the odyn image")
    else:  # the default odyn image of the app's architecture
        task = "odyn_image" if arch == "x86_64" else f"odyn_image_{arch}"
        try:
            record = json.loads(record_path(cache_dir, arch).read_text())
        except OSError:
            raise OperationFailed(f"the default {arch} odyn image has not been built (the app is {arch})",
                                  fix=f"run `doit {task}`" + (" (as root, with qemu-user-static and binfmt: about 5 "
                                                              "minutes the first time)" if arch != "x86_64" else "")
                                  ) from None
        odyn = load_stored(store, DEFAULT_TAGS[arch], Digest.parse(record["digest"]))
    sleeve = None
    if manifest.sources.sleeve:  # the release image's base (upstream's name; `wrapper` before)
        sleeve_ref = manifest.sources.sleeve
        if locked and (locked.get("sleeve") or {}).get("ref") == sleeve_ref:
            sleeve_ref = _pinned(sleeve_ref, locked["sleeve"]["digest"])
        sleeve = resolve(_relative_to(manifest_path, sleeve_ref), sources, file=manifest_path,
                         field="sources.sleeve")
    elif arch == "x86_64":  # the default: enclaver's runtime image, so the release runs with no arguments
        try:
            record = json.loads(record_path(cache_dir, kind="runtime").read_text())
        except OSError:
            raise OperationFailed("enclaver's runtime image (the default sources.sleeve) has not been built",
                                  fix="run `doit runtime_image`") from None
        sleeve = load_stored(store, RUNTIME_TAG, Digest.parse(record["digest"]))
    if sleeve is not None and image_arch(sleeve) != arch:
        raise InvalidInput(f"the sleeve image is {image_arch(sleeve)} but the app is {arch}", field="sources.sleeve",
                           fix=f"name the {arch} build of the runtime image: it runs on the same instance")
    blobs = load_blobs_stamped(str(values.get("build.blobs")), arch, stamps)
    doc = {
        "manifest": {"path": manifest_path, "sha256": hashlib.sha256(raw).hexdigest()},
        "app": {"ref": manifest.sources.app, "name": app.name, "digest": str(app.digest)},
        "odyn": {"ref": manifest.sources.odyn or DEFAULT_TAGS[arch], "name": odyn.name, "digest": str(odyn.digest)},
        "blobs": {"path": str(blobs.root), "digest": str(blobs.digest), "arch": arch,
                  "development": blobs.development},
        "sleeve": None if sleeve is None else {"ref": manifest.sources.sleeve or RUNTIME_TAG, "name": sleeve.name,
                                               "digest": str(sleeve.digest)},
        "settings": _settings(manifest_path, manifest, values),
    }
    if locked is not None:
        stale = lock_differences(locked, doc)
        if stale:
            raise InvalidInput("the inputs no longer match enclaver.lock: " + "; ".join(stale),
                               file=str(lock_path(manifest_path)),
                               fix="if the change is intended, run `enclaver lock --update` and commit the lock")
    write_if_changed(out_dir(cache_dir, name) / RESOLVED, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")
    stamps.save()
    return doc


def resolve_tasks(enclaves: list[Any], cache_dir: str, extra_deps: dict[str, list[str]] | None = None) -> Any:
    yield {"basename": "resolve", "name": None, "doc": "turn every enclave's inputs into digests"}
    for e in enclaves:
        yield {
            "basename": "resolve", "name": e.name, "doc": f"resolve the images and blob set of {e.path}",
            "actions": [(resolve_enclave, [e.path, e.name, cache_dir])],
            "file_dep": [e.path],
            "task_dep": [f"check:{e.name}", "odyn_image", "runtime_image", *(extra_deps or {}).get(e.name, [])],
            "targets": [str(out_dir(cache_dir, e.name) / RESOLVED)],
            "uptodate": [False],  # a tag may have moved: always ask (a pinned input is a store lookup)
            "verbosity": 1,
        }
