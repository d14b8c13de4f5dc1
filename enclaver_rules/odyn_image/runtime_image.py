"""enclaver's runtime image: the host side (`enclaver-run`, a static binary) as the entry point, and the
default base ("sleeve") of every release image, so `docker run --device /dev/nitro_enclaves … RELEASE`
needs no arguments: the release layer adds /enclave (the EIF, its manifest and measurements) on top.

The binary is built like odyn's (same pinned build venv, PyInstaller, staticx; `build.Recipe`) from
the host side's modules only: `runtime/main.py` and what it imports, never the simulator, the engine
adapter or rich (they are not in the build venv, so an import of one could not sneak in unnoticed;
tests/test_imports.py checks the list below against the import graph).

What the image does *not* carry is AWS's nitro-cli: it is a dynamically linked program AWS ships as an
Amazon Linux package (`aws-nitro-enclaves-cli`), not a file that can be fetched and verified here. So
on a Nitro host either run `enclaver run` on the host itself (nitro-cli from dnf), or make a runtime
image on a base that has nitro-cli (examples/runtime/Dockerfile copies this binary onto one) and name
it in the manifest's `sources.sleeve`. Without nitro-cli, enclaver-run says so and exits 1.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from enclaver_rules import __version__
from enclaver_rules.oci.layer import Entry, write_layer
from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image
from enclaver_rules.oci.store import Store, atomic_write
from enclaver_rules.odyn_image.build import BUILD_EPOCH, Binary, Recipe, requirements_file
from enclaver_rules.odyn_image.image import OdynImage

RUN_PATH = "/usr/local/bin/enclaver-run"
DEFAULT_TAG = "enclaver/runtime:default"
LABEL = "dev.enclaver.runtime"
#: The host side's modules (see the module docstring); the simulator's are left out on purpose.
STAGED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("enclaver_rules", (
        "__init__.py", "errors.py", "redact.py", "ports.py", "policy", "manifest", "link",
        "attestation/__init__.py", "attestation/_cbor.py", "attestation/cbor_strict.py", "attestation/cose.py",
        "attestation/errors.py", "attestation/pcrs.py",  # EIF signatures (PCR8) and --verify-before-run
        "cli/__init__.py", "cli/exit_codes.py", "cli/options.py", "cli/run.py",  # one parser with `enclaver run`
        "eif/__init__.py", "eif/describe.py", "eif/files.py", "eif/format.py", "eif/measure.py", "eif/metadata.py",
        "eif/sign.py",
        "oci/__init__.py", "oci/digest.py", "oci/enclave.py", "oci/layer.py", "oci/mediatypes.py", "oci/model.py",
        "oci/mutate.py", "oci/store.py",
        "runtime/__init__.py", "runtime/allocator.py", "runtime/egress_host.py", "runtime/files_out.py",
        "runtime/main.py", "runtime/nitro_cli.py", "runtime/run.py", "runtime/runnable.py", "runtime/systemd.py")),
)
#: The entry sets the version it was built from: the binary carries no package metadata to read it from.
RECIPE = Recipe("enclaver-run", STAGED, f"import enclaver_rules\nenclaver_rules.__version__ = {__version__!r}\n"
                "from enclaver_rules.runtime.main import main\nraise SystemExit(main())\n")


def put_image(store: Store, binary: Binary, tag: str = DEFAULT_TAG, arch: str = "x86_64") -> OdynImage:
    """The runtime image: the binary, a world-writable /tmp (the binary unpacks itself there) and the
    entry point, labelled with what it was built from."""
    data = binary.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != binary.sha256:
        raise ValueError(f"{binary.path} changed while the runtime image was being made")
    buf = io.BytesIO()
    layer = write_layer([Entry.file(RUN_PATH, data, 0o755), Entry.dir("/tmp", 0o1777)], buf, mtime=BUILD_EPOCH)
    store.put_bytes(buf.getvalue(), layer.digest, source="runtime layer")
    manifest, config = empty_image(arch)
    labels = {
        "org.opencontainers.image.title": "enclaver runtime",
        "org.opencontainers.image.description": "enclaver-run: starts /enclave/application.eif with nitro-cli and "
                                                "runs the enclave's host side",
        f"{LABEL}.binary.sha256": binary.sha256,
        f"{LABEL}.source.sha256": binary.source_sha256,
        f"{LABEL}.requirements.sha256": hashlib.sha256(requirements_file().read_bytes()).hexdigest(),
        f"{LABEL}.python": binary.python,
        f"{LABEL}.libc": binary.libc,
    }
    edited = edit_image(manifest, config, layers=[layer], created=BUILD_EPOCH, created_by="enclaver runtime image",
                        edit=ConfigEdit(entrypoint=(RUN_PATH,), env=(("TMPDIR", "/tmp"),),
                                        labels=tuple(sorted(labels.items()))))
    store.keep_image(tag, edited)
    return OdynImage(edited.manifest_digest, tag, binary.size, binary.sha256)


def write_record(path: Path, image: OdynImage) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**image.to_json(), "binary": {"path": RUN_PATH, "size": image.binary_size,
                                            "sha256": image.binary_sha256}}
    atomic_write(path, json.dumps(record, indent=2).encode() + b"\n")
