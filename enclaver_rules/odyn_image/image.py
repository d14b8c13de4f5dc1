"""The default odyn image: the static binary in one reproducible layer, kept in the store.

Upstream's odyn image holds its binary at /usr/local/bin/odyn; the rule set's layer step copies it
to /sbin/odyn in the enclave image. Next to it is /var/lib/odyn, where the binary's two loaders
unpack themselves: the Nitro init mounts /tmp *noexec* (aws-nitro-enclaves-sdk-bootstrap
init/init.c), so the image points TMPDIR there and keeps the app's own TMPDIR in ODYN_APP_TMPDIR,
which odyn restores before it starts the app (odyn.bringup.app_environment).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.layer import Entry, write_layer
from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image
from enclaver_rules.oci.store import Store, atomic_write
from enclaver_rules.odyn_image.build import BUILD_EPOCH, Binary, requirements_file

ODYN_PATH = "/usr/local/bin/odyn"
UNPACK_DIR = "/var/lib/odyn"
DEFAULT_TAG = "enclaver/odyn:default"
#: The default odyn image of each architecture (x86_64 keeps upstream-style `default`).
DEFAULT_TAGS = {"x86_64": DEFAULT_TAG, "aarch64": "enclaver/odyn:default-aarch64"}
LABEL = "dev.enclaver.odyn"


@dataclass(frozen=True)
class OdynImage:
    digest: Digest
    tag: str
    binary_size: int
    binary_sha256: str

    def to_json(self) -> dict[str, object]:
        return {"digest": str(self.digest), "tag": self.tag, "binary": {"path": ODYN_PATH, "size": self.binary_size,
                                                                          "sha256": self.binary_sha256}}


def put_image(store: Store, binary: Binary, tag: str = DEFAULT_TAG, arch: str = "x86_64",
              requirements: tuple[Path, ...] = (), labels: tuple[tuple[str, str], ...] = ()) -> OdynImage:
    """The odyn image for `arch` (the binary's architecture), labelled with what it was built from:
    `requirements` are the pin files (default: requirements.txt), `labels` any more."""
    data = binary.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != binary.sha256:
        raise ValueError(f"{binary.path} changed while the odyn image was being made")
    buf = io.BytesIO()
    layer = write_layer([Entry.file(ODYN_PATH, data, 0o755), Entry.dir(UNPACK_DIR, 0o700)], buf, mtime=BUILD_EPOCH)
    store.put_bytes(buf.getvalue(), layer.digest, source="odyn layer")
    manifest, config = empty_image(arch)
    pins = b"".join(p.read_bytes() for p in requirements) if requirements else requirements_file().read_bytes()
    all_labels = {
        "org.opencontainers.image.title": "odyn",
        "org.opencontainers.image.description": "enclaver's in-enclave supervisor (static binary)",
        f"{LABEL}.binary.sha256": binary.sha256,
        f"{LABEL}.source.sha256": binary.source_sha256,
        f"{LABEL}.requirements.sha256": hashlib.sha256(pins).hexdigest(),
        f"{LABEL}.python": binary.python,
        f"{LABEL}.libc": binary.libc,
        **dict(labels),
    }
    edited = edit_image(manifest, config, layers=[layer], created=BUILD_EPOCH, created_by="enclaver odyn image",
                        edit=ConfigEdit(entrypoint=(ODYN_PATH,), env=(("TMPDIR", UNPACK_DIR), ("ODYN_APP_TMPDIR", "")),
                                        labels=tuple(sorted(all_labels.items()))))
    store.keep_image(tag, edited)
    return OdynImage(edited.manifest_digest, tag, binary.size, binary.sha256)


def write_record(path: Path, image: OdynImage) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(image.to_json(), indent=2).encode() + b"\n")
