"""Find the enclaves of a repository: every `enclaver.yaml` below it (monorepos have many).

Runs when doit loads tasks, even for `doit list`, so it only walks directories and reads the
small manifest files for their names: no hashing, no registry, no Docker.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from enclaver_rules.errors import InvalidInput
from enclaver_rules.manifest.load import DEFAULT_MANIFEST, parse_manifest, read_manifest

#: Directories never searched: VCS data, environments, build output and our own store.
SKIP_DIRS = frozenset({".git", ".hg", ".venv", "venv", "node_modules", "cache", "build", "dist", "__pycache__"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Enclave:
    """One manifest found in the tree. `name` names its tasks: `check:<name>`, later `build:<name>`."""

    name: str
    path: str  # relative to the root, with '/' separators


def _task_name(root: str, path: str) -> str:
    """The manifest's `name`, or its directory when the file cannot say (its check task reports why)."""
    try:
        doc = parse_manifest(read_manifest(os.path.join(root, path)), path)
        name = doc.data.get("name")
        if isinstance(name, str) and _NAME.match(name):
            return name
    except InvalidInput:
        pass
    return os.path.dirname(path).replace("/", "-") or "root"


def discover(root: str) -> list[Enclave]:
    """Every `enclaver.yaml` below `root`, in path order; duplicate names get the path appended."""
    found = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        if DEFAULT_MANIFEST in files:
            found.append(os.path.relpath(os.path.join(current, DEFAULT_MANIFEST), root).replace(os.sep, "/"))
    enclaves: list[Enclave] = []
    taken: set[str] = set()
    for path in sorted(found):
        name = _task_name(root, path)
        if name in taken:
            name = f"{name}~{os.path.dirname(path).replace('/', '-')}"
        taken.add(name)
        enclaves.append(Enclave(name, path))
    return enclaves
