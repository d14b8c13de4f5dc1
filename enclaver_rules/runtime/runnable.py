"""What `enclaver run` was asked to run: a release image in the store, an EIF, or a build's output directory.

Everything is brought to one `Runnable`: the EIF (a file), its PCRs recomputed from it, the manifest,
and the enclave image the EIF was made from. The manifest is always the EIF's own copy, the one odyn
reads inside (/etc/enclaver/enclaver.yaml in the customer ramdisk, under PCR2): the host side then
enforces what the measurements vouch for, never the unmeasured copy a release image carries beside
the EIF. The link from a release image or an EIF to its enclave image is the EIF's metadata:
enclaver writes the enclave image's digest into it (`Metadata.enclaver.image`, also
`ImageVersion`), and that image is in the store beside the build. The simulator runs that image.

Refused: a release image without enclaver's labels, an EIF whose metadata does not say enclaver built it,
an EIF whose CRC32 does not match its bytes (damaged, or changed after it was built), a release image
whose PCR labels are not what its EIF measures (relabelled, or its EIF replaced).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.manifest.model import Manifest
from enclaver_rules.oci import enclave
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import ImageConfig
from enclaver_rules.oci.model import Manifest as ImageManifest
from enclaver_rules.oci.store import CorruptBlob, Store

RELEASE_EIF = "/enclave/application.eif"
BUILD_EIF = "application.eif"


@dataclass(frozen=True, slots=True)
class Runnable:
    source: str  # what the user named
    eif: Path
    measurements: dict[str, str]  # recomputed from the EIF: {"PCR0": hex, …}
    manifest: Manifest
    enclave_image: Digest | None  # the image the EIF was made from, when the store has it
    labels: dict[str, str]


def _manifest_from(raw: bytes, where: str) -> Manifest:
    from enclaver_rules.manifest.load import load_manifest

    with tempfile.TemporaryDirectory(prefix="enclaver-run-") as tmp:
        path = os.path.join(tmp, "enclaver.yaml")
        Path(path).write_bytes(raw)
        try:
            manifest, _ = load_manifest(path)
        except InvalidInput as e:
            raise InvalidInput(f"{where}: its enclaver.yaml is not valid: {e}",
                               fix="rebuild it with this enclaver") from None
    return manifest


def _image(store: Store, digest: Digest) -> tuple[ImageManifest, ImageConfig]:
    found = store.manifest(digest)
    if not isinstance(found, ImageManifest):
        raise InvalidInput(f"{digest} is an index, not one image", fix="name one platform's image")
    return found, ImageConfig.parse(store.read(found.config.digest), f"{digest.short} config")


#: The manifest's path in the customer ramdisk (linuxkit puts the image's root under rootfs/).
EIF_MANIFEST = "rootfs" + enclave.MANIFEST_PATH
MAX_MANIFEST = 1 << 20


def eif_facts(path: Path, source: str | None = None) -> tuple[dict[str, str], dict[str, Any], bytes | None]:
    """(the PCRs recomputed from the EIF, its describe metadata, the manifest it carries). An EIF whose
    CRC32 does not match its bytes is refused (`source`: what the user named, for the message): it
    was damaged or changed after it was built."""
    from enclaver_rules.eif.describe import measure
    from enclaver_rules.eif.files import find_file
    from enclaver_rules.eif.format import SECTION_METADATA, read_eif
    from enclaver_rules.eif.metadata import read_metadata

    eif = read_eif(str(path))
    if not eif.crc_ok:
        raise OperationFailed(f"{source or path}: the EIF's CRC32 does not match its contents: it was damaged or "
                              "changed after it was built",
                              fix="do not run it: build it again, or pull the release image again from its registry")
    measurements, _ = measure(eif)
    pcrs = {k: v for k, v in measurements.to_json().items() if k.startswith("PCR")}
    meta: dict[str, Any] = {}
    sections = eif.of(SECTION_METADATA)
    if sections:
        with contextlib.suppress(ValueError):
            meta = read_metadata(eif.read(sections[0], 1 << 20))
    return pcrs, meta, find_file(eif, EIF_MANIFEST, MAX_MANIFEST)


def resolve(source: str, store: Store | None, workdir: Path) -> Runnable:
    """`source`: an EIF file, a directory holding application.eif (cache/out/NAME/latest, or a
    release image's /enclave), or the name of a release image in `store` (`enclaver image pull`
    brings one from a registry). No store (the runtime image): files and directories only."""
    labels: dict[str, str] = {}
    path = Path(source)
    if path.is_dir() and (path / BUILD_EIF).is_file():
        eif = path / BUILD_EIF
    elif path.is_file():
        eif = path
    elif store is None:
        raise InvalidInput(f"{source}: no such file or directory holding {BUILD_EIF}",
                           fix="give an EIF or the directory it is in (a release image has /enclave)")
    else:
        descriptor = store.resolve(source)
        if descriptor is None:
            raise InvalidInput(f"{source}: no such file, build directory or image in the store {store.root}",
                               fix="give an EIF, a build's output directory (cache/out/NAME/latest) or a release "
                                   "image's name; `enclaver image pull` brings one from a registry")
        image, config = _image(store, descriptor.digest)
        labels = config.labels
        if f"{enclave.LABEL}.version" not in labels:
            raise InvalidInput(f"{source}: not built by enclaver (no {enclave.LABEL}.* labels)",
                               fix="run a release image that `enclaver build` or `doit build:NAME` made")
        eif = workdir / BUILD_EIF
        with open(eif, "wb") as out:
            try:
                found = store.copy_file(image, RELEASE_EIF, out)
            except CorruptBlob as e:  # the store's message names the blob; say whose it is
                first = e.diagnostics[0]
                raise CorruptBlob(f"{source}: a layer of the release image (read for {RELEASE_EIF}): {first.message}",
                                  fix=first.fix) from None
            if not found:
                raise InvalidInput(f"{source}: no {RELEASE_EIF} in it: not a release image",
                                   fix="run a release image, not an enclave or app image")
    pcrs, meta, raw = eif_facts(eif, source)
    _check_labels(source, labels, pcrs)
    details = meta.get("Metadata") or {}
    ours = details.get("enclaver") if isinstance(details, dict) else None
    if details.get("BuildTool") != "enclaver" or not isinstance(ours, dict):
        raise InvalidInput(f"{source}: the EIF was not built by enclaver (its metadata names "
                           f"{details.get('BuildTool') or 'no build tool'})",
                           fix="build it with `enclaver build`; nitro-cli's EIFs lack the enclave image and manifest")
    if raw is None:
        raise InvalidInput(f"{source}: the EIF carries no {enclave.MANIFEST_PATH}, so its manifest is unknown",
                           fix="build it with `enclaver build` (odyn reads the manifest from there)")
    enclave_image: Digest | None = None
    with contextlib.suppress(ValueError):
        digest = Digest.parse(str(ours.get("image")))
        if store is not None and store.has(digest):
            enclave_image = digest
    return Runnable(source, eif, pcrs, _manifest_from(raw, source), enclave_image, labels)


def _check_labels(source: str, labels: dict[str, str], pcrs: dict[str, str]) -> None:
    """A release image's PCR labels (what `enclaver trust` reads without --recompute) must be what its EIF
    measures: when they are not, the image was relabelled or its EIF replaced after it was built."""
    wrong = enclave.label_disagreements(enclave.label_pcrs(labels), pcrs)
    if wrong:
        raise OperationFailed(f"{source}: its labels and its EIF disagree: " + "; ".join(wrong),
                              fix="do not run it: it was relabelled or its EIF replaced after it was built; pull it "
                                  "again from a registry you trust, or build it again")


def verify_measurements(runnable: Runnable, expected: dict[int, bytes], where: str) -> None:
    """`--verify-before-run`: every PCR in the file must equal the EIF's; a mismatch names each one."""
    wrong = []
    for index, value in sorted(expected.items()):
        got = runnable.measurements.get(f"PCR{index}")
        if got is None or got.lower() != value.hex():
            wrong.append(f"PCR{index} expected {value.hex()} got {got or 'none'}")
    if wrong:
        raise OperationFailed(f"{runnable.source}: the EIF's measurements do not match {where}: " + "; ".join(wrong),
                              fix="this is not the enclave those measurements describe: do not run it")
