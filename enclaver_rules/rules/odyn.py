"""Tasks `odyn_image` and `odyn_image_aarch64`: build the static odyn binary and keep the default
odyn image of that architecture in the store.

`odyn_image_aarch64` runs the same build in an arm64 Debian root under qemu-user
(`enclaver_rules.odyn_image.cross`: about 5 minutes the first time, 2 with the root kept), so it is
never a dependency of another task: `resolve` of an aarch64 enclave names it when its image is
missing. Its record is `out/odyn/aarch64/image.json`, next to the root's package list.

Re-runs only when a staged source, the pinned requirements or the build code change, or when the
image has gone from the store (`enclaver cache gc`). The binary and the temporary build tree are
in `cache/odyn-build/`; the build venv is at the fixed path `/tmp/enclaver-odyn-<hash>`, because
PyInstaller's output depends on the venv's location and two machines must agree byte for byte
(see `enclaver_rules.odyn_image.build.build_venv`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit.tools import config_changed

from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.store import Store
from enclaver_rules.rules.common import reported

RECORD = Path("out") / "odyn" / "image.json"
AARCH64_RECORD = Path("out") / "odyn" / "aarch64" / "image.json"
RUNTIME_RECORD = Path("out") / "runtime" / "image.json"


def record_path(cache_dir: str, arch: str = "x86_64", kind: str = "odyn") -> Path:
    if kind == "runtime":
        return Path(cache_dir) / RUNTIME_RECORD
    return Path(cache_dir) / (AARCH64_RECORD if arch == "aarch64" else RECORD)


@reported
def build_odyn_image(cache_dir: str) -> dict[str, Any]:
    from enclaver_rules.odyn_image.build import build_binary
    from enclaver_rules.odyn_image.image import put_image, write_record

    cache = Path(cache_dir)
    binary = build_binary(cache / "odyn-build", cache / "odyn-build" / "odyn")
    image = put_image(Store(cache).init(), binary)
    write_record(record_path(cache_dir), image)
    print(f"odyn: static binary {binary.size:,} bytes ({binary.size / 2**20:.1f} MiB), sha256 {binary.sha256}")
    print(f"odyn: image {image.digest} tagged {image.tag} (Python {binary.python}, {binary.libc})")
    return image.to_json()


@reported
def build_odyn_image_aarch64(cache_dir: str) -> dict[str, Any]:
    from enclaver_rules.odyn_image import cross
    from enclaver_rules.odyn_image.image import DEFAULT_TAGS, LABEL, put_image, write_record

    cache = Path(cache_dir)
    binary, listed = cross.build_binary(cache / "odyn-build", cache / "odyn-build" / "odyn-aarch64")
    record = record_path(cache_dir, "aarch64")
    record.parent.mkdir(parents=True, exist_ok=True)
    (record.parent / "debian-arm64.txt").write_text(listed)
    labels = ((f"{LABEL}.debian.sha256", hashlib.sha256(listed.encode()).hexdigest()),)
    image = put_image(Store(cache).init(), binary, DEFAULT_TAGS["aarch64"], "aarch64",
                      tuple(cross.requirement_files()), labels)
    write_record(record, image)
    print(f"odyn: aarch64 static binary {binary.size:,} bytes ({binary.size / 2**20:.1f} MiB), sha256 {binary.sha256}")
    print(f"odyn: image {image.digest} tagged {image.tag} (Python {binary.python}, {binary.libc}; "
          f"packages in {record.parent / 'debian-arm64.txt'})")
    return image.to_json()


@reported
def build_runtime_image(cache_dir: str) -> dict[str, Any]:
    from enclaver_rules.odyn_image.build import build_binary
    from enclaver_rules.odyn_image.runtime_image import RECIPE, put_image, write_record

    cache = Path(cache_dir)
    binary = build_binary(cache / "odyn-build", cache / "odyn-build" / "enclaver-run", recipe=RECIPE)
    image = put_image(Store(cache).init(), binary)
    write_record(record_path(cache_dir, kind="runtime"), image)
    print(f"runtime: enclaver-run static binary {binary.size:,} bytes ({binary.size / 2**20:.1f} MiB), "
          f"sha256 {binary.sha256}")
    print(f"runtime: image {image.digest} tagged {image.tag}")
    return image.to_json()


def image_present(cache_dir: str, arch: str = "x86_64", kind: str = "odyn") -> bool:
    """The record exists and the store still has the image it names."""
    try:
        record = json.loads(record_path(cache_dir, arch, kind).read_text())
        return Store(cache_dir).has(Digest.parse(record["digest"]))
    except (OSError, ValueError, KeyError):
        return False


def odyn_tasks(cache_dir: str) -> Iterator[dict[str, Any]]:
    import platform

    from enclaver_rules.odyn_image.build import SYSTEM_PYTHON, hook_files, requirements_file, source_files
    from enclaver_rules.odyn_image.cross import requirement_files
    from enclaver_rules.odyn_image.runtime_image import RECIPE as RUNTIME

    here = Path(__file__).resolve().parent.parent / "odyn_image"
    code = [str(p) for p in sorted(here.glob("*.py"))]
    shared = [str(p) for p in source_files()] + [str(p) for p in hook_files()]
    deps = shared + [str(requirements_file())] + [c for c in code if not c.endswith("cross.py")]
    yield {
        "basename": "odyn_image",
        "doc": "build the static odyn binary and the default odyn image (reproducible; size printed)",
        "actions": [(build_odyn_image, [cache_dir])],
        "file_dep": deps,
        "targets": [str(record_path(cache_dir))],
        "uptodate": [config_changed({"python": SYSTEM_PYTHON, "machine": platform.machine()}),
                     (image_present, [cache_dir])],
        "verbosity": 2,
    }
    yield {
        "basename": "odyn_image_aarch64",
        "doc": "the same for aarch64, built in an arm64 Debian root under qemu-user (root; ~5 min first, then ~2)",
        "actions": [(build_odyn_image_aarch64, [cache_dir])],
        "file_dep": shared + code + [str(p) for p in requirement_files()] + [str(here / "debian-arm64.txt")],
        "targets": [str(record_path(cache_dir, "aarch64"))],
        "uptodate": [(image_present, [cache_dir, "aarch64"])],
        "verbosity": 2,
    }
    yield {
        "basename": "runtime_image",
        "doc": "build enclaver-run (the host side, static) and the runtime image, the default base of release images",
        "actions": [(build_runtime_image, [cache_dir])],
        "file_dep": [str(p) for p in source_files(RUNTIME)] + [str(p) for p in hook_files()]
                    + [str(requirements_file())] + [c for c in code if not c.endswith("cross.py")],
        "targets": [str(record_path(cache_dir, kind="runtime"))],
        "uptodate": [config_changed({"python": SYSTEM_PYTHON, "machine": platform.machine()}),
                     (image_present, [cache_dir, "x86_64", "runtime"])],
        "verbosity": 2,
    }
