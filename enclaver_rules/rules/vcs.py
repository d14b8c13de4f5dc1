"""Where a manifest's source lives: the git commit and remote, for the release image's
`org.opencontainers.image.revision` and `.source` labels.

Asked of `git` itself (worktrees, packed refs and submodules are its business), once per
repository per process: doit checks every enclave of a monorepo in one process, and three git calls
per run cost milliseconds where three per enclave would cost a tenth of a second at fifty enclaves.
So a tree edited during one doit run is judged as it was when first asked.

**Revision.** The commit, or `<commit>+dirty` when the build may not be what that commit gives, so
that the label never claims a commit the image was not built from. Dirty means:

* any change to a file git tracks, staged or not, anywhere in the repository (`git describe
  --dirty`'s rule): the app's sources usually live in the same repository as its manifest, and a
  manifest reaches outside its own directory (`build.blobs: ../../blobs`); checking the commit out
  and rebuilding must give this build, and with a tracked change it may not;
* the manifest itself not in the commit (untracked, or git-ignored): its bytes are in the image.

Other untracked files, even beside the manifest, do not count. Whatever enters the image from them
is pinned by its own digest label (the app image, the blob set; the signing certificate by PCR8),
and the build itself makes untracked files: doit's `__pycache__/` beside `dodo.py`, `cache/` where
it is not ignored, an `oci:` app layout built from sources. Counting them would label the second
build of a fresh clone, or even its first, `+dirty` with nothing changed. setuptools-scm and
`git describe --dirty` draw the same line.

`+dirty` rather than refusing: a developer's build of work in progress is normal and useful, and
the label says honestly what it is; a release pipeline builds from a clean checkout, and whoever
pins a KMS key to a release image sees `+dirty` in its labels (`enclaver image inspect` shows
them). A clean tree gives exactly the labels, hence the release image, it gave before this rule
existed.
Two dirty builds of one commit share the label but not necessarily the image: the image's own
digests (app, odyn, blob set, PCRs) say what is inside; the label only says where it came from.

**Source.** The `origin` remote, only when it is a network URL (https, http, ssh, git, or scp-like
`user@host:path`, which becomes `ssh://host/path`), with any user and password removed
(`https://token@host/…` is how CI often clones). A local path (`/home/me/repo`, `../repo`,
`file:///…`), a loopback host or a remote helper (`transport::address`) gives no source label: it
names a place on the build host, means nothing to whoever reads the label, and leaks the host's
layout (user names, directory structure) into a published image.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

REVISION = "org.opencontainers.image.revision"
SOURCE = "org.opencontainers.image.source"
DIRTY = "+dirty"
GIT_TIMEOUT = 10.0
NETWORK_SCHEMES = frozenset({"https", "http", "ssh", "git", "git+ssh", "ssh+git"})
_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?([^:/\[\]]+):(?!//)(.+)$")
_REMOTE_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")


def _loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def public_url(url: str) -> str:
    """A remote URL fit for a label, or "" when it is not a network URL (see the module's
    docstring: a local path must never reach a label). No credentials, query or fragment. Pure."""
    url = url.strip()
    if not url or _REMOTE_HELPER.match(url) or "\\" in url:
        return ""
    scp = _SCP_LIKE.match(url)
    if scp and "://" not in url:
        host = scp.group(1)
        # `C:/Users/me/repo` is a Windows path, not host `C`; git never takes a one-letter host there
        if len(host) == 1 or _loopback(host):
            return ""
        return f"ssh://{host}/{scp.group(2).lstrip('/')}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return ""
    if parts.scheme.lower() not in NETWORK_SCHEMES or not parts.hostname or _loopback(parts.hostname):
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return urlunsplit((parts.scheme.lower(), host + (f":{port}" if port else ""), parts.path, "", ""))


def _toplevel(start: Path) -> Path | None:
    for directory in (start, *start.parents):
        if (directory / ".git").exists():
            return directory
    return None


@dataclass(frozen=True, slots=True)
class _Checkout:
    """What git says of one repository: HEAD, the public origin, whether a tracked file differs
    from HEAD, and the paths git does not track (untracked or ignored; relative to the top level,
    POSIX; a directory is one entry ending in `/`, as `git status` collapses it)."""

    revision: str
    source: str
    modified: bool
    not_tracked: tuple[str, ...]

    def dirty_for(self, manifest: str) -> bool:
        """Dirty for the manifest at `manifest` (relative to the top level, POSIX)."""
        return self.modified or any(p == manifest or (p.endswith("/") and manifest.startswith(p))
                                    for p in self.not_tracked)


def _status(porcelain: str) -> tuple[bool, tuple[str, ...]]:
    """Parse `git status --porcelain=v1 -z`: (a tracked change exists, untracked and ignored paths)."""
    modified, not_tracked = False, []
    entries = iter(porcelain.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if code in ("??", "!!"):
            not_tracked.append(path)
        else:
            modified = True
            if "R" in code or "C" in code:
                next(entries, None)  # a rename's or copy's source path follows as its own field
    return modified, tuple(not_tracked)


@functools.lru_cache(maxsize=64)
def _ask(toplevel: str) -> _Checkout:
    """Three git calls for one repository, asked once per process (see the module's docstring)."""
    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: `git status` would otherwise refresh the index under a lock,
            # which fails beside a concurrent git command (an editor, a `doit -n` worker)
            result = subprocess.run(["git", "--no-optional-locks", "-C", toplevel, *args], capture_output=True,
                                    text=True, errors="surrogateescape", timeout=GIT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout if result.returncode == 0 else None

    revision = (git("rev-parse", "--verify", "--quiet", "HEAD") or "").strip()
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", revision):
        revision = ""
    source = public_url(git("config", "--get", "remote.origin.url") or "")
    # --ignored=matching lists an ignored directory as one entry, without walking into it
    status = git("status", "--porcelain=v1", "-z", "--untracked-files=normal", "--ignored=matching") \
        if revision else ""
    # a status git could not give is taken as dirty: claiming a clean commit needs evidence
    modified, not_tracked = _status(status) if status is not None else (True, ())
    return _Checkout(revision, source, modified, not_tracked)


def source_labels(manifest_path: str) -> dict[str, str]:
    """The revision and source labels for the repository holding `manifest_path`; none outside git.
    The revision is `<commit>+dirty` when a tracked file differs from the commit or the manifest is
    not in it (the module's docstring says why those and nothing else)."""
    path = Path(manifest_path).absolute()
    manifest = path.parent.resolve() / path.name  # a symlinked manifest is tracked as the link
    top = _toplevel(manifest.parent)
    if top is None:
        return {}
    checkout = _ask(str(top))
    labels = {}
    if checkout.revision:
        relative = PurePosixPath(*manifest.relative_to(top).parts).as_posix()
        labels[REVISION] = checkout.revision + (DIRTY if checkout.dirty_for(relative) else "")
    if checkout.source:
        labels[SOURCE] = checkout.source
    return labels
