"""doit task generators: the rule set. `dodo.py` imports `tasks()` and declares nothing else.

Each step of the pipeline is a generator in its own module (`check`, `odyn`; resolve, layer,
eif, release, push and trust as they arrive), yielding tasks named `<step>:<enclave>`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from enclaver_rules.oci.store import default_cache_dir
from enclaver_rules.rules.build import build_tasks, resolve_tasks, trust_tasks
from enclaver_rules.rules.check import check_tasks, explain_tasks
from enclaver_rules.rules.discover import Enclave, discover
from enclaver_rules.rules.odyn import odyn_tasks

DOIT_CONFIG: dict[str, Any] = {
    # sqlite3, not dbm: dbm is single-writer and breaks `doit -n 2`
    "backend": "sqlite3",
    "dep_file": "cache/doit.sqlite3",
    "default_tasks": ["check", "explain"],
    "verbosity": 1,
}


def tasks(root: str, extra_deps: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The task creators for doit, keyed `task_<step>`, over every enclave found below `root`.
    `extra_deps` names tasks an enclave's inputs come from (by enclave name), e.g. an image made here."""
    enclaves = discover(root)

    def task_check() -> Iterator[dict[str, Any]]:
        """validate every enclaver.yaml"""
        yield from check_tasks(enclaves)

    def task_explain() -> Iterator[dict[str, Any]]:
        """explain every enclaver.yaml"""
        yield from explain_tasks(enclaves)

    def task_odyn_image() -> Iterator[dict[str, Any]]:
        """build the static odyn binary and the default odyn image"""
        yield from odyn_tasks(str(default_cache_dir(root)))

    def task_resolve() -> Iterator[dict[str, Any]]:
        """resolve every enclave's inputs to digests"""
        yield from resolve_tasks(enclaves, str(default_cache_dir(root)), extra_deps or {})

    def task_build() -> Iterator[dict[str, Any]]:
        """build every enclave"""
        yield from build_tasks(enclaves, str(default_cache_dir(root)))

    def task_trust() -> Iterator[dict[str, Any]]:
        """write every enclave's KMS key policy"""
        yield from trust_tasks(enclaves, str(default_cache_dir(root)))

    return {"task_check": task_check, "task_explain": task_explain, "task_odyn_image": task_odyn_image,
            "task_resolve": task_resolve, "task_build": task_build, "task_trust": task_trust}


__all__ = ["DOIT_CONFIG", "Enclave", "discover", "tasks"]
