"""Tasks `release:<name>` (the release image) and `build:<name>` (every build step of one enclave).

The release image is what the runtime image consumes: the EIF at /enclave/application.eif, the
manifest and measurements.json beside it, on the base `sources.sleeve` names (resolved by the
resolve step; empty when none is named, until enclaver's runtime image exists), labelled with what
was built from what. It is a function of the EIF entry, the sleeve and the git commit, so its
summary, `build.json`, is written into the EIF entry's directory and redone when the sleeve or the
commit changes; every later step and command reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from enclaver_rules import __version__
from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.store import Store, atomic_write
from enclaver_rules.rules.common import (
    BUILD,
    EIF_FILE,
    EIF_RECORD,
    LATEST,
    MEASUREMENTS,
    RESOLVED,
    build_settings,
    latest_dir,
    out_dir,
    reported,
)
from enclaver_rules.rules.vcs import source_labels

RELEASE_EIF = "/enclave/application.eif"
RELEASE_MANIFEST = "/enclave/enclaver.yaml"
RELEASE_MEASUREMENTS = "/enclave/measurements.json"


def _present(store: Store, summary: dict[str, Any]) -> bool:
    return store.has(Digest.parse(summary["release_image"]))


def release_labels(record: dict[str, Any], title: str, sleeve: dict[str, Any] | None,
                   source: dict[str, str]) -> dict[str, str]:
    """Labels (also the manifest's annotations) of a release image: who built it from what, its PCRs,
    its base and the commit."""
    from enclaver_rules.oci import enclave
    from enclaver_rules.oci.mutate import rfc3339

    inputs = record["inputs"]
    return {
        "org.opencontainers.image.created": rfc3339(record["epoch"]),
        "org.opencontainers.image.title": title,
        f"{enclave.LABEL}.version": __version__,
        f"{enclave.LABEL}.app.digest": inputs["app"]["digest"],
        f"{enclave.LABEL}.odyn.digest": inputs["odyn"]["digest"],
        f"{enclave.LABEL}.blobs.digest": inputs["blobs"]["digest"],
        f"{enclave.LABEL}.blobs.development": str(record["development"]).lower(),
        **{f"{enclave.LABEL}.{k.lower()}": v for k, v in record["measurements"].items()},
        **({f"{enclave.LABEL}.sleeve.digest": sleeve["digest"]} if sleeve else {}),
        **source,
    }


@reported
def release_enclave(manifest_path: str, name: str, cache_dir: str) -> dict[str, Any]:
    from enclaver_rules.oci.layer import Entry, write_layer
    from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image
    from enclaver_rules.oci.transfer import load_stored

    manifest, _ = build_settings(manifest_path)
    sleeve = json.loads((out_dir(cache_dir, name) / RESOLVED).read_text()).get("sleeve")
    entry = latest_dir(cache_dir, name)
    record = json.loads((entry / EIF_RECORD).read_text())
    store = Store(cache_dir).init()
    try:
        summary: dict[str, Any] = json.loads((entry / BUILD).read_text())
        if _current(summary, record, manifest_path, sleeve) and _present(store, summary):
            digest = Digest.parse(summary["release_image"])  # the target tag may name another build now
            store.tag(summary["target"], Descriptor(mt.OCI_MANIFEST, digest, store.path(digest).stat().st_size))
            return summary
    except (OSError, ValueError, KeyError):
        pass
    raw = Path(manifest_path).read_bytes()
    epoch = record["epoch"]
    # doit found the EIF up to date by its stamp (size, mtime, inode): its bytes go into the image,
    # so they are checked against the digest its record (and the labels below) name
    if Digest.of_file(entry / EIF_FILE).hex != record["eif"]["sha256"]:
        raise OperationFailed(f"{entry / EIF_FILE} is not the EIF its record names: it changed after it was built",
                              fix=f"run `doit clean eif:{name}`, then build again")
    layer_file = entry / ".release-layer.tar.gz"  # streamed: the EIF is as large as the app
    with open(layer_file, "wb") as f:
        layer = write_layer([Entry.from_file(RELEASE_EIF, entry / EIF_FILE, 0o644),
                             Entry.file(RELEASE_MANIFEST, raw, 0o644),
                             Entry.file(RELEASE_MEASUREMENTS, (entry / MEASUREMENTS).read_bytes(), 0o644)],
                            f, mtime=epoch)
    with open(layer_file, "rb") as f:
        store.put_stream(f, layer.digest, layer.size, source="release layer")
    layer_file.unlink()
    if sleeve:
        base = load_stored(store, sleeve["name"], Digest.parse(sleeve["digest"]))
        base_manifest, base_config = base.manifest, base.config
    else:
        base_manifest, base_config = empty_image(record["inputs"]["blobs"]["arch"])
    source = source_labels(manifest_path)
    labels = tuple(sorted(release_labels(record, manifest.name, sleeve, source).items()))
    released = edit_image(base_manifest, base_config, layers=[layer], created=epoch, created_by="enclaver release",
                          edit=ConfigEdit(labels=labels), annotations=labels)
    store.keep_image(record["target"], released)
    summary = {**record, "release_image": str(released.manifest_digest), "source": source,
               "sleeve": sleeve["digest"] if sleeve else None}
    atomic_write(entry / BUILD, json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n")
    return summary


def _current(summary: dict[str, Any], record: dict[str, Any], manifest_path: str, sleeve: dict[str, Any] | None) -> bool:
    """The summary is of this EIF entry, this commit and this sleeve: neither the revision label nor
    the base is in the EIF's key, so a new commit or runtime image reuses the EIF and redoes only this."""
    return bool(summary["key"] == record["key"] and summary.get("source", {}) == source_labels(manifest_path)
                and summary.get("sleeve") == (sleeve["digest"] if sleeve else None))


def release_present(cache_dir: str, name: str, manifest_path: str) -> bool:
    """doit's up-to-date check: the summary describes the latest EIF and this commit, and its image
    is in the store."""
    try:
        entry = latest_dir(cache_dir, name)
        summary = json.loads((entry / BUILD).read_text())
        record = json.loads((entry / EIF_RECORD).read_text())
        sleeve = json.loads((out_dir(cache_dir, name) / RESOLVED).read_text()).get("sleeve")
        return _current(summary, record, manifest_path, sleeve) and _present(Store(cache_dir), summary)
    except (OSError, ValueError, KeyError):
        return False


def release_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    yield {"basename": "release", "name": None, "doc": "make every enclave's release image"}
    for e in enclaves:
        latest = out_dir(cache_dir, e.name) / LATEST
        yield {
            "basename": "release", "name": e.name, "doc": f"the release image of {e.path} (EIF, manifest, PCRs)",
            "actions": [(release_enclave, [e.path, e.name, cache_dir])],
            "file_dep": [e.path, str(out_dir(cache_dir, e.name) / RESOLVED), str(latest / EIF_RECORD)],
            "targets": [str(latest / BUILD)],
            "uptodate": [(release_present, [cache_dir, e.name, e.path])],
            "verbosity": 1,
        }


def build_tasks(enclaves: list[Any]) -> Any:
    """`build:<name>`: resolve, layer, eif and release of one enclave, as one name to ask for."""
    yield {"basename": "build", "name": None, "doc": "build every enclave: enclave image, EIF, measurements, "
                                                     "release image"}
    for e in enclaves:
        yield {"basename": "build", "name": e.name, "doc": f"build {e.path}", "actions": [],
               "task_dep": [f"release:{e.name}"]}
