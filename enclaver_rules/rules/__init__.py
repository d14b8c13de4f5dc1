"""doit task generators: the rule set. `dodo.py` imports `tasks()` and declares nothing else.

Each step of the pipeline is a generator in its own module, yielding tasks named `<step>:<enclave>`:
`check`, `explain`, `odyn_image` (once), `resolve` (inputs → digests), `layer` (enclave image),
`eif` (EIF + measurements; the remote cache lives here), `release` (release image; `build:<name>`
names resolve → release), `trust` (KMS key policy), `show` (PCRs and output paths, always),
`push`, `verify` (CI), `run_enclave` (enclaver run of the latest build; never a default). Each step's key covers
its inputs' digests and enclaver's version; see `common` for where outputs go.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from enclaver_rules.rules.check import check_tasks, explain_tasks
from enclaver_rules.rules.clean import add_clean
from enclaver_rules.rules.discover import Enclave, discover
from enclaver_rules.rules.eif import eif_tasks
from enclaver_rules.rules.layer import layer_tasks
from enclaver_rules.rules.odyn import odyn_tasks
from enclaver_rules.rules.push import push_tasks
from enclaver_rules.rules.release import build_tasks, release_tasks
from enclaver_rules.rules.resolve import resolve_tasks
from enclaver_rules.rules.run import run_tasks
from enclaver_rules.rules.show import show_tasks
from enclaver_rules.rules.trust import trust_tasks
from enclaver_rules.rules.verify import verify_tasks

#: doit's settings; `tasks()` returns them as `DOIT_CONFIG` with `dep_file` inside the cache, so a
#: dodo.py that does `globals().update(tasks(ROOT))` gets both. This module-level copy (state file
#: `cache/doit.sqlite3` relative to the dodo.py) is kept for dodo.py files written before that.
DOIT_CONFIG: dict[str, Any] = {
    # sqlite3, not dbm: dbm is single-writer and breaks `doit -n 2`
    "backend": "sqlite3",
    "dep_file": "cache/doit.sqlite3",
    "default_tasks": ["check", "explain"],
    "verbosity": 1,
}
STATE_FILE = "doit.sqlite3"


def cache_dir_for(root: str) -> Path:
    """The cache of the repository at `root`: `$ENC_CACHE_DIR`, else `<root>/cache`. One setting
    moves everything, doit's state included."""
    env = os.environ.get("ENC_CACHE_DIR")
    return Path(env).resolve() if env else Path(root).resolve() / "cache"


def doit_config(cache: str | os.PathLike[str]) -> dict[str, Any]:
    """DOIT_CONFIG with doit's state file in `cache`, which is created: doit opens its sqlite file
    before any task runs and fails with `sqlite3.OperationalError` when the directory is missing."""
    Path(cache).mkdir(parents=True, exist_ok=True)
    return {**DOIT_CONFIG, "dep_file": str(Path(cache) / STATE_FILE)}


def tasks(root: str, extra_deps: dict[str, list[str]] | None = None, enclaves: list[Enclave] | None = None,
          cache_dir: str | None = None) -> dict[str, Any]:
    """The task creators for doit, keyed `task_<step>`, and `DOIT_CONFIG`, over every enclave found
    below `root` (or the `enclaves` given, as `enclaver build -f` does). `extra_deps` names tasks an
    enclave's inputs come from (by enclave name), e.g. an image made here. The cache is `cache_dir`,
    else `cache_dir_for(root)`; doit's state lives in it."""
    if enclaves is None:
        enclaves = discover(root)
    # the build steps use real absolute paths: doit keys its state by them, so `doit` here, from a
    # subfolder (`doit -k`), through a symlinked checkout and `enclaver build -f` from anywhere agree
    # (check and explain keep the paths people read)
    absolute = [Enclave(e.name, os.path.realpath(os.path.join(root, e.path))) for e in enclaves]
    cache = str(Path(cache_dir).resolve()) if cache_dir else str(cache_dir_for(root))

    def task_check() -> Iterator[dict[str, Any]]:
        """validate every enclaver.yaml"""
        yield from check_tasks(enclaves)

    def task_explain() -> Iterator[dict[str, Any]]:
        """explain every enclaver.yaml"""
        yield from explain_tasks(enclaves)

    def task_odyn_image() -> Iterator[dict[str, Any]]:
        """build the static odyn binary and the default odyn image"""
        yield from odyn_tasks(cache)

    def task_resolve() -> Iterator[dict[str, Any]]:
        """resolve every enclave's inputs to digests"""
        yield from resolve_tasks(absolute, cache, extra_deps or {})

    def task_layer() -> Iterator[dict[str, Any]]:
        """make every enclave image (app + odyn + manifest)"""
        yield from layer_tasks(absolute, cache)

    def task_eif() -> Iterator[dict[str, Any]]:
        """build every enclave's EIF and measurements"""
        yield from eif_tasks(absolute, cache)

    def task_release() -> Iterator[dict[str, Any]]:
        """make every enclave's release image"""
        yield from release_tasks(absolute, cache)

    def task_build() -> Iterator[dict[str, Any]]:
        """build every enclave"""
        yield from build_tasks(absolute)

    def task_trust() -> Iterator[dict[str, Any]]:
        """write every enclave's KMS key policy"""
        yield from trust_tasks(absolute, cache)

    def task_show() -> Iterator[dict[str, Any]]:
        """print every enclave's PCRs and where its outputs are"""
        yield from show_tasks(absolute, cache)

    def task_push() -> Iterator[dict[str, Any]]:
        """push every enclave's release image, measurements and policy"""
        yield from push_tasks(absolute, cache)

    def task_verify() -> Iterator[dict[str, Any]]:
        """prove every enclave's build reproduces bit for bit (CI)"""
        yield from verify_tasks(absolute, cache)

    def task_run_enclave() -> Iterator[dict[str, Any]]:
        """enclaver run of an enclave's latest build: doit run_enclave:NAME -- [enclaver run flags]"""
        yield from run_tasks(absolute, cache)

    def cleaned(creator: Callable[[], Iterator[dict[str, Any]]]) -> Callable[[], Iterator[dict[str, Any]]]:
        @functools.wraps(creator)  # doit reads the docstring, and the source line to order creators
        def create() -> Iterator[dict[str, Any]]:
            for task in creator():
                yield add_clean(task, cache)

        return create

    creators = {"task_check": task_check, "task_explain": task_explain, "task_odyn_image": task_odyn_image,
            "task_resolve": task_resolve, "task_layer": task_layer, "task_eif": task_eif,
            "task_release": task_release, "task_build": task_build, "task_trust": task_trust, "task_show": task_show,
            "task_push": task_push, "task_verify": task_verify, "task_run_enclave": task_run_enclave}
    return {"DOIT_CONFIG": doit_config(cache), **{k: cleaned(v) for k, v in creators.items()}}


__all__ = ["DOIT_CONFIG", "Enclave", "cache_dir_for", "discover", "doit_config", "tasks"]
