"""Task `push:<name>`: the release image to its `target`, with its measurements and KMS key policy
attached as OCI referrers (the `sha256-<hex>` tag fallback where the registry has no referrers API).
Plain HTTP only to local registries and those named in ENC_INSECURE_REGISTRY (comma-separated).
"""

from __future__ import annotations

import json
from typing import Any

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


@reported
def push_enclave(cache_dir: str, name: str) -> dict[str, Any]:
    """Push the latest release image to its `target`, then attach its measurements and KMS key
    policy as OCI referrers (the `sha256-<hex>` tag fallback where the registry has no referrers API)."""
    from enclaver_rules.oci import referrers
    from enclaver_rules.oci.reference import Reference
    from enclaver_rules.oci.registry import Registry
    from enclaver_rules.oci.transfer import load_stored, push

    latest = latest_dir(cache_dir, name)
    summary = json.loads((latest / BUILD).read_text())
    target = Reference.parse(summary["target"])
    registry = Registry(target.registry, insecure=target.registry in insecure_registries())
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
            "verbosity": 2,
        }
