"""Tasks `check:<name>` (validate a manifest; incremental) and `explain:<name>` (describe it).

The generators only declare; the actions are module-level functions over plain strings, so doit
can pickle them for `doit -n N`.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from typing import Any

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from enclaver_rules import __version__
from enclaver_rules.manifest import check_file, load_manifest
from enclaver_rules.manifest.explain import render_text
from enclaver_rules.manifest.schema import schema_bytes
from enclaver_rules.rules.common import reported
from enclaver_rules.rules.discover import Enclave

Task = dict[str, Any]


@reported
def check_manifest(path: str) -> dict[str, Any] | TaskFailed:
    """Validate one manifest; warnings go to stderr, errors fail the task with every diagnostic."""
    result = check_file(path)
    errors = [str(d) for d in result.diagnostics if d.severity == "error"]
    for d in result.diagnostics:
        if d.severity == "warning":
            print(d, file=sys.stderr)
    if errors:
        return TaskFailed("\n".join(errors))
    return {"valid": True, "warnings": len(result.diagnostics)}


@reported
def explain_manifest(path: str) -> None:
    manifest, _ = load_manifest(path)
    print("\n".join(render_text(manifest)))


def check_tasks(enclaves: list[Enclave]) -> Iterator[Task]:
    yield {"basename": "check", "name": None, "doc": "validate every enclaver.yaml (re-runs only when one changes)"}
    for e in enclaves:
        yield {
            "basename": "check",
            "name": e.name,
            "doc": f"validate {e.path}",
            "actions": [(check_manifest, [e.path])],
            "file_dep": [e.path],
            # a new enclaver or schema may judge the same file differently
            "uptodate": [config_changed({"enclaver": __version__, "schema": hashlib.sha256(schema_bytes()).hexdigest()})],
            "verbosity": 1,
        }


def explain_tasks(enclaves: list[Enclave]) -> Iterator[Task]:
    yield {"basename": "explain", "name": None, "doc": "say in plain words what every enclave is allowed to do"}
    for e in enclaves:
        yield {
            "basename": "explain",
            "name": e.name,
            "doc": f"explain {e.path}",
            "actions": [(explain_manifest, [e.path])],
            "task_dep": [f"check:{e.name}"],
            "uptodate": [False],
            "verbosity": 2,
        }
