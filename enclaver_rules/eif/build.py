"""Build an EIF from a stored image and a blob set: the pure backend (no Docker, no nitro-cli).

One streaming pass: the layers are read once into a metadata tree (gzip layers inflated to a
work directory), the ramdisks are described entry by entry so their sizes are known up front,
and the EIF is written with the CRC and PCR chains computed as the bytes go by. The output is
written to a temp file beside the target and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from enclaver_rules import __version__
from enclaver_rules.eif.blobs import BlobSet, image_arch
from enclaver_rules.eif.format import (
    SECTION_CMDLINE,
    SECTION_KERNEL,
    SECTION_METADATA,
    SECTION_RAMDISK,
    SECTION_SIGNATURE,
    SectionSource,
    write_eif,
)
from enclaver_rules.eif.measure import Measurements, extend
from enclaver_rules.eif.metadata import kernel_info, metadata_json
from enclaver_rules.eif.output import Output
from enclaver_rules.eif.ramdisk import bootstrap, command_files, customer
from enclaver_rules.eif.rootfs import build_tree
from enclaver_rules.eif.sign import Signer, measure_sections, signature_section
from enclaver_rules.errors import InvalidInput
from enclaver_rules.oci.store import Store, atomic_file

if TYPE_CHECKING:  # transfer imports the registry client (requests): not needed to build
    from enclaver_rules.oci.transfer import StoredImage


@dataclass(frozen=True, slots=True)
class EifResult:
    path: Path
    measurements: Measurements
    size: int
    crc: int
    arch: str
    blobs: BlobSet
    image: StoredImage

    def to_json(self) -> dict[str, object]:
        return {"Measurements": self.measurements.to_json(), "eif": str(self.path), "size": self.size,
                "crc32": f"{self.crc:08x}", "arch": self.arch, "blobs": self.blobs.to_json(),
                "image": {"name": self.image.name, "digest": str(self.image.digest)},
                "development": self.blobs.development}


def _file_chunks(path: Path) -> Callable[[], Iterator[bytes]]:
    def read() -> Iterator[bytes]:
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")
    return read


def boot_pcr1(blobs: BlobSet) -> str:
    """PCR1 of every EIF built on `blobs`: kernel ‖ cmdline ‖ bootstrap ramdisk, all three made from
    the blob set alone. Lets an EIF from elsewhere (a remote cache) be checked against the blob set
    here without rebuilding it."""
    boot = hashlib.sha384()
    for chunk in _file_chunks(blobs.kernel)():
        boot.update(chunk)
    boot.update(blobs.cmdline_bytes())
    for chunk in bootstrap(blobs.init, blobs.nsm).stream():
        boot.update(chunk)
    return extend(boot.digest())


def build_eif(image: StoredImage, store: Store, blobs: BlobSet, output: str | os.PathLike[str], *,
              epoch: int = 0, image_name: str | None = None, signer: Signer | None = None,
              workdir: str | None = None, progress: Callable[[int], None] | None = None) -> EifResult:
    """Write the EIF for `image` to `output`; the architecture comes from the image, never the host."""
    arch = image_arch(image)
    if blobs.arch != arch:
        raise InvalidInput(f"the image is {arch} but the blob set at {blobs.root} is {blobs.arch}", file="--blobs",
                           fix=f"use a blob set for {arch}")
    target = Path(output)
    with tempfile.TemporaryDirectory(prefix="enclaver-eif-", dir=workdir) as work:
        tree = build_tree([(f"{image.name} layer {d.digest.short}", store.path(d.digest))
                           for d in image.manifest.layers], work)
        cmd, env = command_files(image.config.cmd, image.config.entrypoint, image.config.env)
        boot, app = bootstrap(blobs.init, blobs.nsm), customer(tree, cmd, env)
        os_name, kernel_version = kernel_info(blobs.kernel_config.read_text(errors="replace")
                                              if blobs.kernel_config else None)
        metadata = metadata_json(
            image_name=image_name or image.name, image_version=image.digest.hex, epoch=epoch, tool="enclaver",
            tool_version=__version__, operating_system=os_name, kernel_version=kernel_version,
            custom={"enclaver": {"blobs": str(blobs.digest), "development": blobs.development,
                                 "image": str(image.digest)}})
        cmdline = blobs.cmdline_bytes()
        sections = [
            SectionSource(SECTION_KERNEL, blobs.kernel.stat().st_size, _file_chunks(blobs.kernel)),
            SectionSource(SECTION_CMDLINE, len(cmdline), lambda: iter([cmdline])),
            SectionSource(SECTION_METADATA, len(metadata), lambda: iter([metadata])),
            SectionSource(SECTION_RAMDISK, boot.size, boot.stream),
            SectionSource(SECTION_RAMDISK, app.size, app.stream),
        ]
        pcr8 = None
        if signer is not None:
            pcr0 = measure_sections(sections).pcr0
            signature = signature_section(signer, pcr0)
            sections.append(SectionSource(SECTION_SIGNATURE, len(signature), lambda: iter([signature])))
            pcr8 = signer.pcr8
        with atomic_file(target) as out:
            try:
                crc, measurements, size = write_eif(out, arch, sections, progress=progress, output=Output)
            finally:  # every layer blob matched its digest, or the EIF is not kept
                tree.checks.wait()
    if pcr8:
        measurements = Measurements(measurements.pcr0, measurements.pcr1, measurements.pcr2, pcr8)
    return EifResult(target, measurements, size, crc, arch, blobs, image)
