"""Task `odyn_image`: build the static odyn binary and keep the default odyn image in the store.

Re-runs only when a staged source, the pinned requirements or the build code change, or when the
image has gone from the store (`enclaver cache gc`). The binary and the temporary build tree are
in `cache/odyn-build/`; the build venv is at the fixed path `/tmp/enclaver-odyn-<hash>`, because
PyInstaller's output depends on the venv's location and two machines must agree byte for byte
(see `enclaver_rules.odyn_image.build.build_venv`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit.tools import config_changed

from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.store import Store
from enclaver_rules.rules.common import reported

RECORD = Path("out") / "odyn" / "image.json"


def record_path(cache_dir: str) -> Path:
    return Path(cache_dir) / RECORD


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


def image_present(cache_dir: str) -> bool:
    """The record exists and the store still has the image it names."""
    try:
        record = json.loads(record_path(cache_dir).read_text())
        return Store(cache_dir).has(Digest.parse(record["digest"]))
    except (OSError, ValueError, KeyError):
        return False


def odyn_tasks(cache_dir: str) -> Iterator[dict[str, Any]]:
    import platform

    from enclaver_rules.odyn_image.build import SYSTEM_PYTHON, hook_files, requirements_file, source_files

    here = Path(__file__).resolve().parent.parent / "odyn_image"
    deps = [str(p) for p in source_files()] + [str(requirements_file())] + [str(p) for p in sorted(here.glob("*.py"))]
    deps += [str(p) for p in hook_files()]
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
