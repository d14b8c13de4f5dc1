"""Kernel blob sets: the kernel, its cmdline, the enclave init and nsm.ko that every EIF carries.

A blob set is a directory laid out like nitro-cli's (`/usr/share/nitro_enclaves/blobs`):
`bzImage` (x86_64) or `Image` (aarch64), optionally `<kernel>.config`, `cmdline`, `init`,
`nsm.ko`. Its digest (sha256 over the names and digests of those files) is recorded with every
output, since PCR1 depends on nothing else. `write_dev_blobs` makes a deterministic development
set — not bootable, marked as such — so the pipeline can be tried where no real set exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from enclaver_rules.errors import InvalidInput
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.store import atomic_write

KERNEL_NAMES = {"x86_64": "bzImage", "aarch64": "Image"}
DEFAULT_BLOBS = Path("/usr/share/nitro_enclaves/blobs")
MARKER = "enclaver-blobs.json"
#: nitro-cli's cmdline blobs (aws/aws-nitro-enclaves-cli blobs/<arch>/cmdline), trailing newline included.
NITRO_CMDLINES = {
    "x86_64": "reboot=k panic=30 pci=off nomodules console=ttyS0 i8042.noaux i8042.nomux i8042.nopnp "
              "i8042.dumbkbd random.trust_cpu=on\n",
    "aarch64": "reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on root=/dev/ram0\n",
}
ARCH_OF_PLATFORM = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True, slots=True)
class BlobSet:
    root: Path
    arch: str
    kernel: Path
    cmdline: Path
    init: Path
    nsm: Path | None
    kernel_config: Path | None
    development: bool
    digest: Digest

    def cmdline_bytes(self) -> bytes:
        """nitro-cli trims the cmdline file and stores it without a NUL."""
        return self.cmdline.read_text(encoding="utf-8").strip().encode("utf-8")

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.root), "arch": self.arch, "digest": str(self.digest), "development": self.development}


def _file_digest(path: Path) -> str:
    return Digest.of_file(path).hex


def load_blobs(path: str | Path, arch: str, expect: Digest | None = None) -> BlobSet:
    root = Path(path)
    if arch not in KERNEL_NAMES:
        raise InvalidInput(f"{arch!r} is not an enclave architecture", fix="use x86_64 or aarch64")
    if not root.is_dir():
        raise InvalidInput(f"{root}: no such blob directory", file=str(root),
                           fix=f"install aws-nitro-enclaves-cli ({DEFAULT_BLOBS}), or make a development set with "
                               f"`enclaver blobs dev -o DIR`")
    kernel = root / KERNEL_NAMES[arch]
    missing = [p.name for p in (kernel, root / "cmdline", root / "init") if not p.is_file()]
    if missing:
        other = "x86_64" if arch == "aarch64" else "aarch64"
        hint = f" (it holds {KERNEL_NAMES[other]}: an {other} blob set?)" if (root / KERNEL_NAMES[other]).is_file() else ""
        raise InvalidInput(f"{root}: missing {', '.join(missing)} for {arch}{hint}", file=str(root),
                           fix="point --blobs at a blob set of the enclave's architecture")
    nsm = root / "nsm.ko" if (root / "nsm.ko").is_file() else None
    config = root / f"{kernel.name}.config" if (root / f"{kernel.name}.config").is_file() else None
    marker = root / MARKER
    development = False
    if marker.is_file():
        try:
            development = bool(json.loads(marker.read_text()).get("development"))
        except (OSError, ValueError):
            raise InvalidInput(f"{marker}: unreadable", fix="regenerate the blob set") from None
    files = {p.name: _file_digest(p) for p in (kernel, root / "cmdline", root / "init", nsm, config, marker if
                                                marker.is_file() else None) if p is not None}
    digest = Digest.of(json.dumps(files, sort_keys=True, separators=(",", ":")).encode())
    if expect is not None and digest != expect:
        raise InvalidInput(f"{root}: blob set digest is {digest}, expected {expect}", file=str(root),
                           fix="the blobs changed (another nitro-cli version?); check them, or update the recorded digest")
    return BlobSet(root, arch, kernel, root / "cmdline", root / "init", nsm, config, development, digest)


def _filler(label: bytes, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(label + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def write_dev_blobs(out: str | Path, arch: str) -> BlobSet:
    """A deterministic development blob set: same bytes on every machine, never bootable."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    kernel_name = KERNEL_NAMES[arch]
    banner = f"ENCLAVER DEVELOPMENT {{}} ({arch}) - NOT BOOTABLE, NOT FOR PRODUCTION\n"
    files = {
        kernel_name: banner.format("KERNEL").encode() + _filler(f"kernel-{arch}".encode(), 256 << 10),
        f"{kernel_name}.config": f"#\n# Automatically generated file; DO NOT EDIT.\n"
                                 f"# Linux/{arch} 4.14.256-enclaver-dev Kernel Configuration\n".encode(),
        "cmdline": NITRO_CMDLINES[arch].encode(),
        "init": banner.format("INIT").encode() + _filler(f"init-{arch}".encode(), 64 << 10),
        "nsm.ko": banner.format("NSM DRIVER").encode() + _filler(f"nsm-{arch}".encode(), 16 << 10),
        MARKER: json.dumps({"development": True, "arch": arch,
                            "note": "made by `enclaver blobs dev`; EIFs built from it cannot run on Nitro"},
                           sort_keys=True, indent=2).encode() + b"\n",
    }
    for name, data in files.items():
        atomic_write(root / name, data)
    return load_blobs(root, arch)
