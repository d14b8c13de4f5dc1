"""What every build step shares: where outputs go, how a step's key is made, how a task fails.

Outputs of one enclave live in `cache/out/<name>/`: `resolved.json` and `stamps.json` (resolve), `layer.json`
(layer), and one directory per EIF key, `<key>/`, holding the EIF, `measurements.json`,
`eif.json` (eif), `build.json` (release), `kms-policy.json` (trust) and `pushed.json` (push);
`latest` is a symlink to the newest such directory, replaced atomically.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from doit.exceptions import TaskFailed

from enclaver_rules import __version__, redact
from enclaver_rules.errors import EnclaverError
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.store import atomic_write

RESOLVED = "resolved.json"
#: Beside resolved.json: the stamps of the local files resolve hashed, and what it found (oci/stamps.py).
STAMPS = "stamps.json"
LAYER = "layer.json"
EIF_RECORD = "eif.json"
BUILD = "build.json"
POLICY = "kms-policy.json"
PUSHED = "pushed.json"
EIF_FILE = "application.eif"
MEASUREMENTS = "measurements.json"
LATEST = "latest"


class _Reporter(Protocol):
    def task(self, description: str, total: int | None) -> Callable[[int], None]: ...

    def done(self, description: str) -> None: ...


#: Who draws progress for the long steps (building, fetching or storing an EIF). `enclaver build`
#: installs its rich reporter here while it runs doit in its own process; under plain `doit` (and
#: in `doit -n` workers) it stays None and the steps print their summary lines only.
_reporter: _Reporter | None = None


def set_reporter(reporter: _Reporter | None) -> None:
    global _reporter
    _reporter = reporter


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None] | None]:
    """A callback that advances a progress bar by a number of bytes, or None when nobody draws."""
    if _reporter is None:
        yield None
        return
    advance = _reporter.task(description, total)
    try:
        yield advance
    finally:
        _reporter.done(description)


def reported(action: Callable[..., Any]) -> Callable[..., Any]:
    """Fail a task the way the CLI fails a command: an enclaver error with its message (file,
    field, fix), a system error (a missing or unreadable file) with its path and reason, anything
    else as an internal error; a traceback only with ENC_DEBUG=1, as `--debug` does for the CLI.
    Whatever the failure says, and the traceback, pass through `redact` first: doit prints a task's
    failure as it is, so this is the task's last line of defence for secrets, as the CLI printer is
    the command's. functools.wraps keeps the name, so doit can still pickle the action for `-n`."""
    def failed(text: str) -> TaskFailed:
        return TaskFailed(redact.text(text))

    def debug_traceback() -> None:
        if os.environ.get("ENC_DEBUG"):
            sys.stderr.write(redact.text(traceback.format_exc()))

    @functools.wraps(action)
    def run(*args: Any, **kwargs: Any) -> Any:  # kwargs: what doit passes by name (pos_arg, params)
        try:
            return action(*args, **kwargs)
        except EnclaverError as e:
            return failed(str(e))
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            debug_traceback()
            return failed(f"{where}{e.strerror or e}")
        except Exception as e:  # noqa: BLE001 - the last line of defence, as in the CLI
            debug_traceback()
            return failed(f"internal error: {type(e).__name__}: {e} — this is a bug in enclaver: "
                          "run again with ENC_DEBUG=1 and report the traceback")

    return run


def out_dir(cache_dir: str, name: str) -> Path:
    return Path(cache_dir) / "out" / name


def latest_dir(cache_dir: str, name: str) -> Path:
    """The newest complete build of `name` (resolved: readers keep reading one entry even if
    `latest` moves under them)."""
    return (out_dir(cache_dir, name) / LATEST).resolve()


def step_key(step: str, parts: dict[str, Any]) -> str:
    """A step's cache key: its inputs' digests and settings, the step's name and enclaver's version.
    128 bits of SHA-256 over canonical JSON: stable across runs, machines and Python versions."""
    document = {"step": step, "enclaver": __version__, **parts}
    return hashlib.sha256(canonical_json(document)).hexdigest()[:32]


def write_if_changed(path: Path, data: bytes) -> bool:
    """Rewrite a record only when its bytes change: doit's file_dep then re-runs the next step
    exactly when an input did (the record's mtime alone would re-run it every time)."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return True


def point_latest(out: Path, key: str) -> None:
    link = out / LATEST
    tmp = out / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(key, tmp)
    os.replace(tmp, link)  # atomic: readers see the old or the new entry, never none


def insecure_registries() -> frozenset[str]:
    """Registries named in ENC_INSECURE_REGISTRY (comma-separated): plain HTTP allowed to them."""
    return frozenset(h.strip() for h in os.environ.get("ENC_INSECURE_REGISTRY", "").split(",") if h.strip())


def build_settings(manifest_path: str) -> tuple[Any, dict[str, Any]]:
    """The manifest and its effective settings (ENC_* applied; a relative blob path is relative to
    the manifest, like its other paths)."""
    from enclaver_rules.manifest import resolve as resolve_config

    config = resolve_config(manifest_path, {}, os.environ)
    manifest = config.require_manifest()
    values: dict[str, Any] = {}
    base = Path(manifest_path).resolve().parent
    for v in config.values:
        values[v.setting.key] = v.value
        if v.setting.key == "build.blobs" and v.origin == "file" and not Path(str(v.value)).is_absolute():
            values[v.setting.key] = os.path.normpath(base / str(v.value))
    return manifest, values


def signing_files(manifest_path: str, manifest: Any) -> tuple[Path, Path] | None:
    base = Path(manifest_path).resolve().parent
    if not manifest.signature:
        return None
    return base / manifest.signature.certificate, base / manifest.signature.key
