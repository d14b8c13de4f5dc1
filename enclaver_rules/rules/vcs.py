"""Where a manifest's source lives: the git commit and remote, for the release image's
`org.opencontainers.image.revision` and `.source` labels.

Asked of `git` itself (worktrees, packed refs and submodules are its business), once per
repository per process: doit checks every enclave of a monorepo in one process, and two git calls
per run cost milliseconds where two per enclave would cost a tenth of a second at fifty enclaves.
A remote URL loses any user and password before it becomes a label (`https://token@host/…` is how
CI often clones), and an scp-like `git@host:path` becomes `ssh://host/path`.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REVISION = "org.opencontainers.image.revision"
SOURCE = "org.opencontainers.image.source"
_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?([^:/]+):(?!//)(.+)$")


def public_url(url: str) -> str:
    """A remote URL fit for a label: no credentials. Pure."""
    url = url.strip()
    scp = _SCP_LIKE.match(url)
    if scp and "://" not in url:
        return f"ssh://{scp.group(1)}/{scp.group(2)}"
    parts = urlsplit(url)
    if parts.hostname is None:
        return url if "@" not in url else ""
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _toplevel(start: Path) -> Path | None:
    for directory in (start, *start.parents):
        if (directory / ".git").exists():
            return directory
    return None


@functools.lru_cache(maxsize=64)
def _ask(toplevel: str) -> tuple[tuple[str, str], ...]:
    def git(*args: str) -> str:
        try:
            result = subprocess.run(["git", "-C", toplevel, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""

    labels = {}
    revision = git("rev-parse", "--verify", "--quiet", "HEAD")
    if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", revision):
        labels[REVISION] = revision
    source = public_url(git("config", "--get", "remote.origin.url"))
    if source:
        labels[SOURCE] = source
    return tuple(sorted(labels.items()))


def source_labels(manifest_path: str) -> dict[str, str]:
    """The revision and source labels for the repository holding `manifest_path`; none outside git."""
    top = _toplevel(Path(manifest_path).resolve().parent)
    return dict(_ask(str(top))) if top else {}
