"""Allocator advice: what an enclave needs against what the Nitro Enclaves allocator reserves.

Facts, from aws/aws-nitro-enclaves-cli 1.5.0 (commit 2950b36):

* nitro-cli refuses (E26) memory below 4 × the EIF's size, rounded up to whole MiB first
  (`ENCLAVE_MEMORY_EIF_SIZE_RATIO`, `src/enclave_proc/resource_manager.rs`), and (E27) more than the
  hugepages the allocator reserved, which running enclaves share; (E22) more CPUs than the pool.
* `/etc/nitro_enclaves/allocator.yaml` (`bootstrap/allocator.yaml`) holds `memory_mib` and exactly
  one of `cpu_count` or `cpu_pool` (`2,3,6-9`). The allocator service's own parser
  (`bootstrap/nitro-enclaves-allocator`, `parse_config`) is line based: it ignores everything before a
  `---` line, rejects any other key, and reads the rest of a `key: value` line as the value (so a
  trailing comment breaks it). It reserves memory on `systemctl restart nitro-enclaves-allocator`,
  which fails while an enclave runs; `cpu_count` must be a multiple of the threads per core, and CPU 0
  and its siblings stay with the parent.

The functions here are pure but `load` (reads the file), `configure` (writes it, only when the caller
passes `allowed=True`, i.e. the user gave --configure-allocator) and `restart` (through an injectable
runner).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import yaml

from enclaver_rules.errors import Diagnostic, InvalidInput, OperationFailed
from enclaver_rules.manifest.model import Manifest
from enclaver_rules.oci.store import atomic_file
from enclaver_rules.runtime.nitro_cli import Runner, subprocess_runner

ALLOCATOR_FILE = Path("/etc/nitro_enclaves/allocator.yaml")
SERVICE = "nitro-enclaves-allocator.service"
EIF_MEMORY_RATIO = 4  # nitro-cli's ENCLAVE_MEMORY_EIF_SIZE_RATIO
KEYS = ("memory_mib", "cpu_count", "cpu_pool")
MAX_FILE = 64 << 10
RESTART = f"`systemctl restart {SERVICE}`"
_POOL = re.compile(r"\d{1,5}(-\d{1,5})?(,\d{1,5}(-\d{1,5})?)*")
_KEY_LINE = re.compile(r"^\s*([-_A-Za-z0-9]+)\s*:")


@dataclass(frozen=True, slots=True)
class AllocatorConfig:
    memory_mib: int
    cpu_count: int | None = None
    cpu_pool: tuple[int, ...] | None = None

    @property
    def cpus(self) -> int:
        return len(self.cpu_pool) if self.cpu_pool is not None else self.cpu_count or 0


def parse_cpu_pool(text: str) -> tuple[int, ...]:
    """`2,3,6-9` → (2, 3, 6, 7, 8, 9); ValueError for anything else."""
    text = text.strip().replace(" ", "")
    if not _POOL.fullmatch(text):
        raise ValueError(f"cpu_pool {text!r} is not a list of CPUs and ranges such as 2,3,6-9")
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if hi < lo:
            raise ValueError(f"cpu_pool range {part} runs backwards")
        cpus += range(lo, hi + 1)
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"cpu_pool {text!r} names a CPU twice")
    return tuple(cpus)


def parse(text: str, path: str = str(ALLOCATOR_FILE)) -> AllocatorConfig:
    """The file as the allocator service reads it; InvalidInput lists everything the service would
    refuse (or silently ignore), each with its line."""
    problems: list[Diagnostic] = []
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "---"), None)

    def problem(message: str, line: int = 0, field: str = "", fix: str = "") -> None:
        problems.append(Diagnostic(message, path, line, 0, field, fix))

    if start is None:
        problem("no `---` line: the allocator service ignores every line before one", fix="put `---` above the keys")
    for i, line in enumerate(lines):
        key = _KEY_LINE.match(line)
        if line.lstrip().startswith("#") or not key:
            continue
        if start is not None and i < start:
            problem(f"{key.group(1)} is above `---`: the allocator service ignores it", i + 1, key.group(1))
        elif key.group(1) not in KEYS:
            problem(f"unexpected key {key.group(1)}: the allocator service accepts only {', '.join(KEYS)}",
                    i + 1, key.group(1), fix="remove the line")
        elif "#" in line.partition(":")[2]:
            problem("a comment after the value: the allocator service reads it as part of the value", i + 1,
                    key.group(1), fix="move the comment to its own line")
    try:  # what the service reads: the lines after `---`
        data = yaml.safe_load("\n".join(lines[start + 1:])) if start is not None else None
    except yaml.YAMLError as e:
        raise InvalidInput(f"not YAML: {e}", file=path, fix="restore it from the .bak beside it") from None
    data = data if isinstance(data, dict) else {}
    memory, count, pool = data.get("memory_mib"), data.get("cpu_count"), data.get("cpu_pool")
    if not (isinstance(memory, int) and not isinstance(memory, bool) and memory > 0):
        problem("memory_mib is missing or not a positive whole number of MiB", field="memory_mib")
    if count is not None and pool is not None:
        problem("cpu_count and cpu_pool are both set; the allocator service accepts only one", field="cpu_pool")
    elif count is None and pool is None:
        problem("neither cpu_count nor cpu_pool is set", field="cpu_count")
    if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count > 0):
        problem("cpu_count is not a positive whole number", field="cpu_count")
    cpus: tuple[int, ...] | None = None
    if pool is not None:
        try:
            cpus = parse_cpu_pool(str(pool))
        except ValueError as e:
            problem(str(e), field="cpu_pool")
    if problems:
        raise InvalidInput(diagnostics=problems)
    return AllocatorConfig(cast(int, memory), cast("int | None", count), cpus)


def load(path: str | os.PathLike[str] = ALLOCATOR_FILE) -> AllocatorConfig | None:
    """The allocator's configuration, or None when the file does not exist."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OperationFailed(f"cannot read it: {e.strerror or e}", file=str(path),
                              fix="run enclaver as a user that may read it (root)") from None
    if len(data) > MAX_FILE:
        raise InvalidInput(f"larger than {MAX_FILE} bytes: not an allocator file", file=str(path))
    return parse(data.decode("utf-8", "replace"), str(path))


# ---- needs and advice -----------------------------------------------------------------------------

def eif_min_memory_mib(eif_size: int) -> int:
    """nitro-cli's minimum: the EIF's size rounded up to MiB, times 4."""
    return -(-eif_size // (1 << 20)) * EIF_MEMORY_RATIO


@dataclass(frozen=True, slots=True)
class Needs:
    memory_mib: int  # what the enclave will be started with
    cpu_count: int
    eif_min_mib: int  # nitro-cli's floor for this EIF


def needs(manifest: Manifest, eif_size: int, *, memory_mb: int | None = None, cpu_count: int | None = None) -> Needs:
    """The run's memory and CPUs: the flag, else the manifest's `defaults` (upstream's order), and
    the EIF's floor."""
    return Needs(memory_mb if memory_mb is not None else manifest.defaults.memory_mb,
                 cpu_count if cpu_count is not None else manifest.defaults.cpu_count, eif_min_memory_mib(eif_size))


@dataclass(frozen=True, slots=True)
class Advice:
    problems: tuple[str, ...] = ()
    memory_mib: int | None = None  # what --configure-allocator would set (None: leave)
    cpu_count: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def text(self) -> str:
        return "\n".join(self.problems)


def advise(need: Needs, config: AllocatorConfig | None, *, path: str | os.PathLike[str] = ALLOCATOR_FILE,
           in_use_memory_mib: int = 0, in_use_cpus: int = 0) -> Advice:
    """Whether the enclave fits; each problem says what to change. `in_use_*`: what enclaves running
    now hold (from describe-enclaves), which the reservation must also cover."""
    problems: list[str] = []
    memory, want_memory, want_cpus = need.memory_mib, None, None
    if memory < need.eif_min_mib:
        problems.append(f"the EIF needs at least {need.eif_min_mib} MiB ({EIF_MEMORY_RATIO} × its size, nitro-cli's "
                        f"rule) but the enclave is given {memory} MiB: set defaults.memory_mb: {need.eif_min_mib} "
                        f"in enclaver.yaml or pass --memory-mb {need.eif_min_mib}")
        memory = need.eif_min_mib
    if config is None:
        problems.append(f"there is no {path}: install AWS's nitro-cli (it brings the allocator), or run with "
                        f"--configure-allocator to write one reserving {memory + in_use_memory_mib} MiB and "
                        f"{need.cpu_count + in_use_cpus} CPUs, then {RESTART}")
        return Advice(tuple(problems), memory + in_use_memory_mib, need.cpu_count + in_use_cpus)
    others = f" ({in_use_memory_mib} MiB held by enclaves running now)" if in_use_memory_mib else ""
    if memory + in_use_memory_mib > config.memory_mib:
        want_memory = memory + in_use_memory_mib
        problems.append(f"the enclave needs {memory} MiB{others} but the allocator reserves {config.memory_mib} MiB: "
                        f"set memory_mib: {want_memory} in {path} and {RESTART}, or run with --configure-allocator")
    busy = f" ({in_use_cpus} held by enclaves running now)" if in_use_cpus else ""
    if need.cpu_count + in_use_cpus > config.cpus:
        total = need.cpu_count + in_use_cpus
        if config.cpu_pool is not None:
            problems.append(f"the enclave needs {need.cpu_count} CPUs{busy} but the allocator's cpu_pool has "
                            f"{config.cpus}: add CPUs to cpu_pool in {path} (whole cores, never CPU 0 or its "
                            f"siblings) and {RESTART}, or pass --cpu-count {max(1, config.cpus - in_use_cpus)}")
        else:
            want_cpus = total
            problems.append(f"the enclave needs {need.cpu_count} CPUs{busy} but the allocator reserves {config.cpus}: "
                            f"set cpu_count: {total} in {path} (a multiple of the threads per core) and {RESTART}, "
                            f"or run with --configure-allocator")
    return Advice(tuple(problems), want_memory, want_cpus)


# ---- writing it, on request -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Change:
    path: str
    backup: str | None  # where the previous file was copied, None when there was none
    before: str
    after: str
    summary: tuple[str, ...]  # one line per value changed, for the caller to print


def configure(path: str | os.PathLike[str], *, memory_mib: int | None, cpu_count: int | None,
              allowed: bool) -> Change | None:
    """Raise the reservation to at least `memory_mib` and `cpu_count` (None: leave it; never lowered:
    other enclaves may rely on it). Only with `allowed` (the user's --configure-allocator). Comments,
    layout and mode are kept; the old file is copied to `<path>.bak` (or `.bak.N`, never overwriting a
    different backup) and the new one written atomically. Returns None when nothing had to change.
    The allocator still has to be restarted (`restart`)."""
    target = Path(path)
    if not allowed:
        raise InvalidInput(f"enclaver does not change {target} unless asked", file=str(target),
                           fix="run with --configure-allocator, or edit the file yourself")
    for name, value in (("memory_mib", memory_mib), ("cpu_count", cpu_count)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInput(f"{name} {value!r} is not a positive whole number", field=name)
    before = target.read_text() if target.exists() else ""
    current = parse(before, str(target)) if before else None
    if current is not None and current.cpu_pool is not None and cpu_count is not None and cpu_count > current.cpus:
        raise InvalidInput(f"the allocator's cpu_pool names {current.cpus} CPUs and {cpu_count} are needed; "
                           "enclaver does not choose CPUs", file=str(target), field="cpu_pool",
                           fix="add whole cores (never CPU 0 or its siblings) to cpu_pool yourself, or replace "
                               f"cpu_pool with cpu_count: {cpu_count}")
    values: dict[str, int] = {}
    summary: list[str] = []
    if memory_mib is not None and (current is None or memory_mib > current.memory_mib):
        values["memory_mib"] = memory_mib
        summary.append(f"memory_mib: {current.memory_mib if current else 'unset'} → {memory_mib}")
    if cpu_count is not None and (current is None or (current.cpu_pool is None and cpu_count > current.cpus)):
        values["cpu_count"] = cpu_count
        summary.append(f"cpu_count: {current.cpu_count if current else 'unset'} → {cpu_count}")
    if not values:
        return None
    if current is None:  # a new file needs both (memory_mib and a CPU reservation)
        values.setdefault("memory_mib", memory_mib or 512)
        values.setdefault("cpu_count", cpu_count or 2)
    after = _edit(before, values)
    parse(after, str(target))  # what is written must be what the allocator service reads
    backup = _backup(target, before) if before else None
    mode = target.stat().st_mode & 0o7777 if target.exists() else 0o644
    with atomic_file(target, mode) as f:
        f.write(after.encode())
    return Change(str(target), backup, before, after, tuple(summary))


def _edit(text: str, values: dict[str, int]) -> str:
    lines = text.splitlines()
    if not any(line.strip() == "---" for line in lines):
        lines = ["# Enclave configuration file (nitro-enclaves-allocator); written by enclaver --configure-allocator.",
                 "---"] + lines
    todo = dict(values)
    for i, line in enumerate(lines):
        key = _KEY_LINE.match(line)
        if key and not line.lstrip().startswith("#") and key.group(1) in todo:
            lines[i] = f"{key.group(1)}: {todo.pop(key.group(1))}"
    lines += [f"{k}: {v}" for k, v in todo.items()]
    return "\n".join(lines) + "\n"


def _backup(target: Path, before: str) -> str:
    for n in range(1000):
        backup = target.with_name(target.name + (".bak" if n == 0 else f".bak.{n}"))
        if backup.exists() and backup.read_text(errors="replace") != before:
            continue
        with atomic_file(backup, target.stat().st_mode & 0o7777) as f:
            f.write(before.encode())
        return str(backup)
    raise OperationFailed(f"1000 backups of {target} exist already", file=str(target), fix="remove old .bak.N files")


def restart(runner: Runner = subprocess_runner, *, timeout: float = 300.0,
            command: Sequence[str] = ("systemctl", "restart", SERVICE)) -> None:
    """Restart the allocator so it reserves what the file says. It refuses while an enclave runs."""
    done = runner(list(command), timeout)
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode("utf-8", "replace").strip()[-2000:]
        raise OperationFailed(f"`{' '.join(command)}` failed (exit code {done.returncode}): {err}",
                              file=" ".join(command),
                              fix="stop running enclaves first (nitro-cli terminate-enclave --all; the allocator "
                                  f"cannot re-online CPUs under one), then see `journalctl -u {SERVICE}`")
