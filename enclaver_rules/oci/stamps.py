"""File stamps: knowing that a local input has not changed since it was hashed, without hashing it.

The rule set's `resolve` step runs on every `doit build` (a tag may have moved), and used to read and
hash every `oci:` layout, `docker-archive:` file and blob set it names: with 256 MiB apps, about
0.2 s per enclave of a no-op build. Now it keeps a record, `Stamps`, beside the enclave's
`resolved.json`: for each local source, what `stat` said of every file its import read — device,
inode, size, mtime and ctime in nanoseconds, taken *before* the bytes were read — and what the import
found (the image's digest and store ref, or the blob set's digest). When every file still has its
stamp, the recorded result is reused and nothing is hashed; on any difference the source is read and
hashed as before, and the record is replaced. The files that matter: of a layout, `index.json` and
every blob it reached (index, manifest, config, layers); of an archive, the archive; of a blob set,
each of its names, absent ones as absent (a file that appears changes the set).

**Why a matching stamp may be trusted.**

1. *A change is noticed.* Every write, truncate, rename, chmod or `utime` sets a file's ctime to the
   kernel's current time, and no system call sets ctime to a chosen value; a file replaced by another
   has another inode. So new bytes with the old size and a reset mtime (`touch -d`, `os.utime`) still
   change the stamp. Stamps are taken before the bytes are read, so a write during the hash leaves a
   stamp that no longer matches. A file whose ctime is within `RACY_NS` of the moment it was stamped
   is not recorded ("racily clean", as git calls it: a second write in the same clock tick would not
   move ctime), so the next run hashes it again.
2. *What a stamp cannot see does not reach a build unverified.* Bytes changed with every stamp field
   kept (writing the disk under the file system, or setting the clock back and forging the times)
   need root on the build machine. Even then: a hit returns the image the store already holds under
   the recorded digest — the store's own copy, verified when it was written — and nothing is read
   from the source. Every step that consumes bytes reads them from the store through its verified
   reader (`Store.open` → `VerifiedBlob`): the EIF build checks every layer it reads and keeps no
   EIF unless all match, `push` and `copy_file` (odyn's binary) the same, and the EIF step hashes
   the blob set again against the recorded digest (`load_blobs(expect=…)`). So a forged stamp over
   a user's layout can make a build use the image that was verified last time (the digest that
   `resolved.json`, the EIF's record and the release labels all name): stale, never unverified. A
   forged stamp over a blob of the store itself (a layout that *is* the store, or a store copy
   damaged in place) is caught when a step reads the blob: `CorruptBlob`, the blob moved to
   quarantine, the step fails and keeps nothing, and the next resolve, finding the blob gone,
   imports the source again.
3. *The store must still hold the image.* A hit also requires every blob of the image in the store
   and reads its manifest and config (small) through the verified reader; a blob collected or
   quarantined meanwhile means a full import.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from enclaver_rules.oci.store import atomic_write

#: A file changed this recently (ctime) when stamped is not trusted yet: file times come from a
#: coarse clock (a few ms), and network file systems from the server's.
RACY_NS = 2_000_000_000
VERSION = 1

Stamp = list[Any]  # [path, dev, ino, size, mtime_ns, ctime_ns], or [path] for a file that is absent


def stamp_of(path: str | os.PathLike[str], st: os.stat_result | None) -> Stamp:
    """A file's stamp from its `stat` (None: the file is absent)."""
    where = os.path.abspath(path)
    if st is None:
        return [where]
    return [where, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def stamp(path: str | os.PathLike[str], *, follow: bool = True) -> Stamp:
    """Stat `path` now (`follow=False`: the link itself, as `lstat`)."""
    try:
        return stamp_of(path, os.stat(path, follow_symlinks=follow))
    except (FileNotFoundError, NotADirectoryError):
        return stamp_of(path, None)


def _racy(stamps: list[Stamp], now_ns: int) -> bool:
    return any(len(s) > 1 and s[5] > now_ns - RACY_NS for s in stamps)


class Stamps:
    """The record of one resolve: `get` a result whose files are unchanged, `put` a fresh one, `save`.

    Only what this resolve looked up or put is saved, so the record holds the sources the manifest
    names now; it is rewritten only when it changes (a no-op build writes nothing).
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._old: dict[str, Any] = {}
        self._new: dict[str, Any] = {}
        if self.path is not None:
            try:
                document = json.loads(self.path.read_text())
                if isinstance(document, dict) and document.get("version") == VERSION and \
                        isinstance(document.get("sources"), dict):
                    self._old = document["sources"]
            except (OSError, ValueError):
                pass  # none yet, or unreadable: everything is hashed again

    def get(self, key: str) -> dict[str, Any] | None:
        """The result recorded for `key` when every file it read still has its stamp, else None."""
        entry = self._new.get(key, self._old.get(key))
        try:
            if not isinstance(entry, dict):
                return None
            follow = bool(entry.get("follow", True))
            files, value = entry["files"], entry["value"]
            if not isinstance(value, dict) or any(stamp(recorded[0], follow=follow) != recorded for recorded in files):
                return None
        except (KeyError, TypeError, IndexError, ValueError, OSError):
            return None
        self._new[key] = entry
        return value

    def put(self, key: str, files: list[Stamp], value: dict[str, Any], *, follow: bool = True) -> None:
        """Record what hashing `key`'s files found; `files` were stamped before they were read (none:
        a result that holds until someone asks again, such as a registry tag's digest). Not
        recorded when one of them changed too recently to tell a later change apart."""
        if not _racy(files, time.time_ns()):
            self._new[key] = {"files": files, "follow": follow, "value": value}
        else:
            self._new.pop(key, None)

    def save(self) -> None:
        if self.path is None:
            return
        data = json.dumps({"version": VERSION, "sources": self._new}, indent=1, sort_keys=True).encode() + b"\n"
        try:
            if self.path.read_bytes() == data:
                return
        except OSError:
            pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, data)
