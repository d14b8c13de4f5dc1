"""Task `push:<name>`: the release image to its `target`, with its measurements and KMS key policy
attached as OCI referrers (the `sha256-<hex>` tag fallback where the registry has no referrers API).
Plain HTTP only to local registries and those named in ENC_INSECURE_REGISTRY (comma-separated).

Up to date is a fact about the registry, not about local files: `pushed.json` says what was pushed,
but a registry can lose it since (garbage collection, a deleted repository, a fresh registry at the
same address, a tag another push moved). So the up-to-date check asks the registry, cheaply: one
HEAD of the target (its tag names the pushed digest) and one HEAD per attached referrer (by digest),
no bodies, no retries, a few seconds' timeout. When the registry cannot answer, the push is not
up to date: it then runs and reports the real error, with its fix.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.store import Store, atomic_write
from enclaver_rules.rules.common import (
    BUILD,
    LATEST,
    MEASUREMENTS,
    POLICY,
    PUSHED,
    insecure_registries,
    latest_dir,
    out_dir,
    reported,
)

if TYPE_CHECKING:
    from enclaver_rules.oci.reference import Reference
    from enclaver_rules.oci.registry import Registry

#: (connect, read) seconds for the up-to-date check: a registry that cannot answer a HEAD in this
#: time is treated as not having the image, and the push (with its patient timeouts) says why
UPTODATE_TIMEOUT = (3.0, 5.0)


def _registry(target: Reference, *, quick: bool = False) -> Registry:
    """The client for `target`'s registry: its API host (Docker Hub's is not `docker.io`), plain HTTP
    only where ENC_INSECURE_REGISTRY names it (or it is local); `quick` for the up-to-date check."""
    from enclaver_rules.oci.registry import Registry

    insecure = bool({target.registry, target.api_host} & insecure_registries())
    if quick:
        return Registry(target.api_host, insecure=insecure, retries=0, timeout=UPTODATE_TIMEOUT)
    return Registry(target.api_host, insecure=insecure)


@reported
def push_enclave(cache_dir: str, name: str) -> dict[str, Any]:
    """Push the latest release image to its `target`, then attach its measurements and KMS key
    policy as OCI referrers (the `sha256-<hex>` tag fallback where the registry has no referrers API)."""
    from enclaver_rules.oci import referrers
    from enclaver_rules.oci.reference import Reference
    from enclaver_rules.oci.transfer import load_stored, push

    latest = latest_dir(cache_dir, name)
    summary = json.loads((latest / BUILD).read_text())
    target = Reference.parse(summary["target"])
    registry = _registry(target)
    store = Store(cache_dir)
    image = load_stored(store, summary["target"], Digest.parse(summary["release_image"]))
    digest = push(image, store, target, registry)
    subject = Descriptor(image.manifest.media_type, digest, len(image.manifest.raw))
    created = int(summary.get("epoch", 0))
    attached = []
    for kind, file in ((referrers.MEASUREMENTS, latest / MEASUREMENTS), (referrers.KMS_KEY_POLICY, latest / POLICY)):
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


def pushed_present(cache_dir: str, name: str) -> bool:
    """doit's up-to-date check of `push:<name>`: `pushed.json` records the latest release image at
    its current target, and the registry still serves it there, with its referrers.

    No network when the local records already disagree. Otherwise HEAD requests only (see the
    module's docstring), and any failure to get an answer is "not up to date": the push runs and
    reports it properly, which an up-to-date check cannot."""
    from enclaver_rules.oci.reference import Reference

    try:
        latest = latest_dir(cache_dir, name)
        summary = json.loads((latest / BUILD).read_text())
        record = json.loads((latest / PUSHED).read_text())
        target = Reference.parse(summary["target"])
        digest = Digest.parse(summary["release_image"])
        if Reference.parse(record["target"]) != target or Digest.parse(record["digest"]) != digest:
            return False
        referrers = [Digest.parse(r["digest"]) for r in record.get("referrers", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        registry = _registry(target, quick=True)
        if registry.head_manifest(target.repository, target.selector) != digest:
            return False  # gone, or the tag names another image now
        return all(registry.head_manifest(target.repository, str(r)) == r for r in referrers)
    except Exception:  # noqa: BLE001 - whatever went wrong, the push itself will say it with a fix
        return False


def push_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    yield {"basename": "push", "name": None, "doc": "push every enclave's release image with its measurements and policy"}
    for e in enclaves:
        latest = out_dir(cache_dir, e.name) / LATEST
        yield {
            "basename": "push", "name": e.name, "doc": f"push the release image of {e.path} to its target",
            "actions": [(push_enclave, [cache_dir, e.name])],
            "task_dep": [f"trust:{e.name}"],
            "file_dep": [str(latest / BUILD), str(latest / POLICY)],
            "targets": [str(latest / PUSHED)],
            "uptodate": [(pushed_present, [cache_dir, e.name])],
            "verbosity": 2,
        }
