"""State directories that hold private keys (the local KMS's keys, the simulator's CA): made 0700,
refused when they are not ours or others may write them, and key files read only when they are
regular files of ours that nobody else can read. One implementation for both, so the checks
cannot drift apart."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from enclaver_rules.errors import InvalidInput, OperationFailed


def prepare_dir(directory: Path, *, what: str, field: str, fix_other: str, private: bool) -> None:
    """Make `directory` 0700 if missing. Refuse one that is not a directory, not ours, or writable
    by others (with `private`, also readable by others: it then holds only secrets)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(directory)
    except OSError as e:
        raise OperationFailed(f"{directory}: cannot create {what}: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidInput(f"{directory} is not a directory", field=field, fix=fix_other)
    if info.st_uid != os.geteuid():
        raise InvalidInput(f"{directory} belongs to uid {info.st_uid}, not to you (uid {os.geteuid()})",
                           field=field, fix=f"{fix_other}, or `chown -R {os.geteuid()} {directory}`")
    mode = stat.S_IMODE(info.st_mode)
    if mode & (0o077 if private else 0o022):
        kind = "open to others" if private else "writable by others"
        raise InvalidInput(f"{directory} is {kind} (mode {mode:o}): they could read or replace the keys",
                           field=field, fix=f"chmod 700 {directory}")


def read_private(path: Path, limit: int, *, field: str, fix_exposed: str) -> bytes:
    """At most `limit` + 1 bytes of a key file (the caller refuses more), refused unless it is a
    regular file of ours that nobody else can read. Symlinks are not followed."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise InvalidInput(f"{path} is not a regular file of yours (uid {os.geteuid()})", field=field,
                               fix="remove it, or use a state directory of your own")
        if info.st_mode & 0o077:
            raise InvalidInput(f"{path} can be read by others (mode {stat.S_IMODE(info.st_mode):o}): it holds a "
                               f"private key", field=field, fix=f"chmod 600 {path} ({fix_exposed})")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)
