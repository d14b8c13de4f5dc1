"""The local KMS's keys on disk: one JSON file per key (material, policy, grants), kept across restarts.

The state directory is made 0700 and must be ours and writable by nobody else; each key file is
written 0600 through `atomic_file` (a temp file, fsync, rename), so a crash leaves the old key or
the new one, never half of either. A server holds an exclusive `flock` on `lock` for its lifetime:
a second `enclaver kms serve` on the same directory is refused instead of overwriting the first
one's keys. Key material is never logged or printed.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci.store import atomic_file
from enclaver_rules.private_state import prepare_dir, read_private

FORMAT = "enclaver-local-kms-key"
VERSION = 1
MAX_KEY_FILE = 1 << 20
KEY_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class GrantRecord:
    grant_id: str
    grantee: str
    operations: tuple[str, ...]
    name: str = ""
    retiring: str = ""
    created: float = 0.0
    issuer: str = ""


@dataclass(frozen=True, slots=True)
class Key:
    """One KMS key. `material` is the 32-byte AES key (SYMMETRIC_DEFAULT) or a PKCS#8 DER private
    key (ECC key agreement); `policy` the key policy text as it was put."""

    key_id: str
    arn: str
    account: str
    region: str
    created: float
    key_spec: str
    key_usage: str
    policy: str
    material: bytes = field(repr=False)
    description: str = ""
    grants: tuple[GrantRecord, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "key_id": self.key_id, "arn": self.arn,
                "account": self.account, "region": self.region, "created": self.created,
                "key_spec": self.key_spec, "key_usage": self.key_usage, "description": self.description,
                "policy": self.policy, "material": base64.b64encode(self.material).decode(),
                "grants": [{"grant_id": g.grant_id, "grantee": g.grantee, "operations": list(g.operations),
                            "name": g.name, "retiring": g.retiring, "created": g.created, "issuer": g.issuer}
                           for g in self.grants]}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Key:
        try:
            if data["format"] != FORMAT or data["version"] != VERSION:
                raise ValueError(f"format {data['format']!r} version {data['version']!r}")
            grants = tuple(GrantRecord(str(g["grant_id"]), str(g["grantee"]), tuple(map(str, g["operations"])),
                                       str(g["name"]), str(g["retiring"]), float(g["created"]), str(g["issuer"]))
                           for g in data["grants"])
            key = cls(str(data["key_id"]), str(data["arn"]), str(data["account"]), str(data["region"]),
                      float(data["created"]), str(data["key_spec"]), str(data["key_usage"]), str(data["policy"]),
                      base64.b64decode(data["material"], validate=True), str(data["description"]), grants)
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise OperationFailed(f"{where} is not a local KMS key file ({type(e).__name__}: {e})",
                                  fix="restore it from a backup, or remove it (its key is then lost)") from None
        if not KEY_ID.fullmatch(key.key_id) or Path(where).stem != key.key_id:
            raise OperationFailed(f"{where} holds key {key.key_id!r}, not the one its name says",
                                  fix="restore it from a backup, or remove it")
        return key


class KeyStore:
    """The keys of one state directory, in memory and on disk. Thread-safe; `close()` releases the lock."""

    def __init__(self, directory: Path, lock_fd: int, keys: dict[str, Key]) -> None:
        self.directory = directory
        self._lock_fd: int | None = lock_fd
        self._keys = keys
        self._mutex = threading.RLock()  # `update` holds it across its read and its write

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> KeyStore:
        path = Path(directory)
        _prepare(path)
        _prepare(path / "keys")
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OperationFailed(f"{path} is in use by another local KMS (its lock file is held)",
                                  fix="stop that `enclaver kms serve`, or give this one another --state") from None
        try:
            keys = {key.key_id: key for key in _load_all(path / "keys")}
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, keys)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, key_id: str) -> Key | None:
        with self._mutex:
            return self._keys.get(key_id)

    def all(self) -> list[Key]:
        """Every key, oldest first (ListKeys' order)."""
        with self._mutex:
            return sorted(self._keys.values(), key=lambda k: (k.created, k.key_id))

    def put(self, key: Key) -> None:
        """Add or replace `key`, on disk first (0600, atomically), then in memory."""
        if not KEY_ID.fullmatch(key.key_id):
            raise ValueError(f"not a key id: {key.key_id!r}")
        data = json.dumps(key.to_json(), indent=1, sort_keys=True).encode()
        with self._mutex:
            if self._lock_fd is None:
                raise OperationFailed("the key store is closed")
            with atomic_file(self.directory / "keys" / f"{key.key_id}.json", mode=0o600) as f:
                f.write(data)
            self._keys[key.key_id] = key

    def update(self, key_id: str, change: Callable[[Key], Key]) -> Key:
        """Replace the key by `change(key)`, read and written under one lock (two grants made at
        once both stay)."""
        with self._mutex:
            current = self._keys.get(key_id)
            if current is None:
                raise KeyError(key_id)
            new = change(current)
            self.put(new)
            return new


def _prepare(directory: Path) -> None:
    prepare_dir(directory, what="the local KMS's state directory", field="--state",
                fix_other="use a state directory of your own", private=True)


def _load_all(directory: Path) -> Iterator[Key]:
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or entry.suffix != ".json":
            continue  # a temp file left by a crash mid-write: the old key file is intact
        yield Key.from_json(_read_private(entry), str(entry))


def _read_private(path: Path) -> Any:
    raw = read_private(path, MAX_KEY_FILE, field="--state", fix_exposed="and treat the key as exposed")
    if len(raw) > MAX_KEY_FILE:
        raise OperationFailed(f"{path} is larger than {MAX_KEY_FILE} bytes: not a key file")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise OperationFailed(f"{path} is not JSON ({e})", fix="restore it from a backup, or remove it") from None
