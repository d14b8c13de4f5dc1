"""`doit clean`: what each step removes, kept in one place so every step's outputs are known here.

A step's clean removes the records and files it wrote under `cache/out/` and nothing else: the
store (`cache/blobs`, `index.json`) is shared by every enclave and by `enclaver image`, so `doit
clean` never touches it (`enclaver cache gc` collects what no tag reaches). Cleaning a step also
removes what later steps wrote into the same entry, since an EIF entry holds them all.

    doit clean build:hello     # everything enclaver wrote for one enclave
    doit clean -a              # every enclave, and the odyn image's record
    doit clean eif:hello       # the EIF entries (and the release, trust and push records in them)

Removal never follows a symlink out of the cache: `latest` is unlinked, never descended into.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from enclaver_rules.rules.common import BUILD, LATEST, LAYER, POLICY, PUSHED, RESOLVED, STAMPS, out_dir

#: The per-entry record each step writes inside every EIF entry `out/<name>/<key>/`.
ENTRY_RECORDS = {"release": BUILD, "trust": POLICY, "push": PUSHED}


def _entries(out: Path) -> list[Path]:
    """The EIF entries of one enclave: real directories only (not `latest`, not a planted link)."""
    if not out.is_dir() or out.is_symlink():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


def _remove(path: Path, removed: list[str]) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
        removed.append(str(path))
    elif path.is_dir():
        shutil.rmtree(path)
        removed.append(str(path) + "/")


def _report(step: str, name: str, removed: list[str]) -> None:
    task = f"{step}:{name}" if name else step
    print(f"{task}: removed {len(removed)} item(s)" if removed else f"{task}: nothing to remove")


#: Steps whose tasks write something to clean.
CLEANED = ("build", "resolve", "layer", "eif", *ENTRY_RECORDS)


def clean_outputs(step: str, cache_dir: str, name: str) -> None:
    """Remove what `step:<name>` wrote (a module-level function, so doit can pickle it for `-n`)."""
    out = out_dir(cache_dir, name)
    removed: list[str] = []
    if step == "build":
        _remove(out, removed)  # the whole enclave: records, entries, `latest`
    elif step == "resolve":
        _remove(out / RESOLVED, removed)
        if (out / STAMPS).is_file():
            _remove(out / STAMPS, removed)
    elif step == "layer":
        _remove(out / LAYER, removed)
    elif step == "eif":
        for entry in _entries(out):
            _remove(entry, removed)
        _remove(out / LATEST, removed)
    else:
        for entry in _entries(out):
            _remove(entry / ENTRY_RECORDS[step], removed)
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    _report(step, name, removed)


def clean_odyn(cache_dir: str) -> None:
    """The odyn image's record and the built binary (the venv in /tmp is shared and kept)."""
    removed: list[str] = []
    _remove(Path(cache_dir) / "out" / "odyn", removed)
    _remove(Path(cache_dir) / "odyn-build", removed)
    _report("odyn_image", "", removed)


def clean_odyn_aarch64(cache_dir: str) -> None:
    """The aarch64 odyn image's record and binary; the arm64 root stays (minutes to make again)."""
    removed: list[str] = []
    _remove(Path(cache_dir) / "out" / "odyn" / "aarch64", removed)
    _remove(Path(cache_dir) / "odyn-build" / "odyn-aarch64", removed)
    _report("odyn_image_aarch64", "", removed)


def clean_runtime(cache_dir: str) -> None:
    """The runtime image's record and the enclaver-run binary."""
    removed: list[str] = []
    _remove(Path(cache_dir) / "out" / "runtime", removed)
    _remove(Path(cache_dir) / "odyn-build" / "enclaver-run", removed)
    _report("runtime_image", "", removed)


def add_clean(task: dict[str, Any], cache_dir: str) -> dict[str, Any]:
    """`task` with its `clean` actions, for the steps that write outputs."""
    step, name = task.get("basename"), task.get("name")
    if step == "odyn_image":
        return {**task, "clean": [(clean_odyn, [cache_dir])]}
    if step == "odyn_image_aarch64":
        return {**task, "clean": [(clean_odyn_aarch64, [cache_dir])]}
    if step == "runtime_image":
        return {**task, "clean": [(clean_runtime, [cache_dir])]}
    if step in CLEANED and name:
        return {**task, "clean": [(clean_outputs, [step, cache_dir, name])]}
    return task
