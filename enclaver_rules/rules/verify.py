"""Task `verify:<name>` for CI: rebuild from nothing and compare, through `enclaver verify-reproduce`."""

from __future__ import annotations

from typing import Any

from enclaver_rules.rules.common import LATEST, out_dir


def verify_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    """`verify:<name>` for CI: rebuild from nothing in a temporary cache (odyn from source too) and
    fail unless the PCRs equal the latest build's. Always runs: that is its point."""
    import sys

    yield {"basename": "verify", "name": None, "doc": "prove every enclave's build reproduces bit for bit"}
    for e in enclaves:
        latest = out_dir(cache_dir, e.name) / LATEST
        yield {
            "basename": "verify", "name": e.name, "doc": f"rebuild {e.path} from nothing and compare the PCRs",
            "actions": [[sys.executable, "-m", "enclaver_rules.cli", "verify-reproduce", str(latest), "-f", e.path]],
            "task_dep": [f"build:{e.name}"],
            "uptodate": [False],
            "verbosity": 2,
        }
