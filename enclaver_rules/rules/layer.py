"""Task `layer:<name>`: the enclave image, the app image plus one deterministic layer.

The layer holds the manifest byte for byte and odyn (taken from the odyn image); the entrypoint
becomes odyn with the app's entrypoint and cmd after `--` (`enclaver_rules.oci.enclave`). The
image goes into the store, tagged `enclaver/<name>:enclave-<key>`; `out/<name>/layer.json` names
it and is rewritten only when it changes. The key covers the manifest's bytes, the app and odyn
digests, SOURCE_DATE_EPOCH and enclaver's version: nothing else reaches the image.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import Manifest
from enclaver_rules.oci.store import Store
from enclaver_rules.rules.common import LAYER, RESOLVED, out_dir, reported, step_key, write_if_changed

ODYN_IN_IMAGE = "usr/local/bin/odyn"  # upstream's path in an odyn image


def read_resolved(manifest_path: str, cache_dir: str, name: str) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes and the resolve step's record, which must describe those bytes."""
    raw = Path(manifest_path).read_bytes()
    resolved: dict[str, Any] = json.loads((out_dir(cache_dir, name) / RESOLVED).read_text())
    if resolved["manifest"]["sha256"] != hashlib.sha256(raw).hexdigest():
        raise OperationFailed(f"{manifest_path} changed after it was resolved", fix=f"run `doit resolve:{name}` again")
    return raw, resolved


def layer_key(resolved: dict[str, Any]) -> str:
    return step_key("layer", {"manifest": resolved["manifest"]["sha256"], "app": resolved["app"]["digest"],
                              "odyn": resolved["odyn"]["digest"], "epoch": resolved["settings"]["epoch"]})


def _odyn_binary(store: Store, image_digest: Digest, where: str) -> bytes:
    node = store.manifest(image_digest)
    assert isinstance(node, Manifest)
    binary = io.BytesIO()
    if not store.copy_file(node, ODYN_IN_IMAGE, binary):
        raise InvalidInput(f"{where} has no /{ODYN_IN_IMAGE}", field="sources.odyn",
                           fix="name an odyn image (upstream's layout: the binary at /usr/local/bin/odyn)")
    return binary.getvalue()


def _present(store: Store, record: dict[str, Any]) -> bool:
    from enclaver_rules.oci.transfer import find_ref

    descriptor = find_ref(store, record["tag"])
    return descriptor is not None and str(descriptor.digest) == record["enclave_image"] and \
        store.has(descriptor.digest)


@reported
def layer_enclave(manifest_path: str, name: str, cache_dir: str) -> dict[str, Any]:
    from enclaver_rules.oci import enclave
    from enclaver_rules.oci.layer import write_layer
    from enclaver_rules.oci.mutate import edit_image
    from enclaver_rules.oci.transfer import load_stored

    raw, resolved = read_resolved(manifest_path, cache_dir, name)
    key = layer_key(resolved)
    store = Store(cache_dir).init()
    record_path = out_dir(cache_dir, name) / LAYER
    tag = f"enclaver/{name}:enclave-{key[:16]}"
    try:
        record = json.loads(record_path.read_text())
        if record["key"] == key and _present(store, record):
            return record  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError):
        pass
    epoch = resolved["settings"]["epoch"]
    app = load_stored(store, resolved["app"]["name"], Digest.parse(resolved["app"]["digest"]))
    odyn = _odyn_binary(store, Digest.parse(resolved["odyn"]["digest"]), resolved["odyn"]["ref"])
    buf = io.BytesIO()
    layer = write_layer(enclave.layer_entries(raw, odyn), buf, mtime=epoch)
    store.put_bytes(buf.getvalue(), layer.digest, source="enclave layer")
    labels = {f"{enclave.LABEL}.manifest.sha256": resolved["manifest"]["sha256"],
              f"{enclave.LABEL}.app.digest": resolved["app"]["digest"],
              f"{enclave.LABEL}.odyn.digest": resolved["odyn"]["digest"]}
    edited = edit_image(app.manifest, app.config, layers=[layer], created=epoch, created_by="enclaver layer",
                        edit=enclave.config_edit(app.config, resolved["app"]["ref"], labels))
    store.keep_image(tag, edited)
    record = {"key": key, "tag": tag, "enclave_image": str(edited.manifest_digest),
              "app": resolved["app"]["digest"], "odyn": resolved["odyn"]["digest"],
              "manifest": resolved["manifest"]["sha256"], "epoch": epoch}
    write_if_changed(record_path, json.dumps(record, indent=2, sort_keys=True).encode() + b"\n")
    return record


def layer_present(cache_dir: str, name: str) -> bool:
    """doit's up-to-date check: the image layer.json names is still in the store under its tag."""
    try:
        record = json.loads((out_dir(cache_dir, name) / LAYER).read_text())
        return _present(Store(cache_dir), record)
    except (OSError, ValueError, KeyError):
        return False


def layer_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    yield {"basename": "layer", "name": None, "doc": "make every enclave image (app + odyn + manifest)"}
    for e in enclaves:
        out = out_dir(cache_dir, e.name)
        yield {
            "basename": "layer", "name": e.name, "doc": f"the enclave image of {e.path}",
            "actions": [(layer_enclave, [e.path, e.name, cache_dir])],
            "file_dep": [e.path, str(out / RESOLVED)],
            "targets": [str(out / LAYER)],
            "uptodate": [(layer_present, [cache_dir, e.name])],
            "verbosity": 1,
        }
