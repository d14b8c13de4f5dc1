"""Read an `enclaver.yaml`, check it completely, and turn it into a `Manifest`.

Parsing and checking are pure (`parse_manifest`, `validate`); this module adds the I/O edge:
reading the file (or stdin for `-`) and looking at files the manifest names. A check never stops
at the first problem: `check_file` returns every diagnostic, and `load_manifest` raises them all.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from enclaver_rules.errors import Diagnostic, InvalidInput
from enclaver_rules.manifest._yaml import Path, YamlDocument, load_yaml
from enclaver_rules.manifest.config import DEFAULT_MANIFEST as DEFAULT_MANIFEST  # defined there; named here too
from enclaver_rules.manifest.model import Manifest
from enclaver_rules.manifest.semantic import RENAMED_SOURCES, semantic_diagnostics
from enclaver_rules.manifest.validate import FileLocator, Locator, diagnostic, schema_diagnostics

T = TypeVar("T")
#: No real manifest is anywhere near this; a larger file is a mistake (or an attack on the parser).
MAX_MANIFEST_BYTES = 1 << 20


def read_manifest(path: str) -> bytes:
    """The file's bytes exactly (stdin for `-`), or `InvalidInput` saying what to give instead."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        fix = "give the manifest's path with -f, or run where enclaver.yaml is"
        raise InvalidInput("cannot read the manifest: no such file", file=path, fix=fix) from None
    except IsADirectoryError:
        raise InvalidInput("is a directory", file=path,
                           fix=f"give the manifest inside it: {os.path.join(path, DEFAULT_MANIFEST)}") from None
    except OSError as e:
        raise InvalidInput(f"cannot read the manifest: {e.strerror}", file=path, fix="check the path and its permissions") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidInput(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB", file=path, fix="check that this is an enclaver.yaml")
    return raw


def parse_manifest(raw: bytes, filename: str) -> YamlDocument:
    """Decode and parse; raise `InvalidInput` when there is no usable map of keys at all."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise InvalidInput(f"byte 0x{raw[e.start]:02x} is not UTF-8", file=filename, line=line, col=col,
                           fix="save the file as UTF-8 text") from None
    doc = load_yaml(text, filename)
    if doc.data is None:
        raise InvalidInput("the manifest is empty", file=filename, line=1, col=1,
                           fix="start from an example in examples/, e.g. examples/hello/enclaver.yaml")
    if not isinstance(doc.data, dict):
        raise InvalidInput("the manifest must be a map of keys (`version: v1`, `name: …`, …)", file=filename,
                           line=1, col=1, fix="start from an example in examples/, e.g. examples/hello/enclaver.yaml")
    return doc


def validate(data: Any, loc: Locator) -> list[Diagnostic]:
    """Schema and semantic findings, errors and warnings, ordered by position."""
    found = schema_diagnostics(data, loc) + semantic_diagnostics(data, loc)
    return sorted(found, key=lambda d: (d.file, d.line, d.col, d.severity != "error", d.field))


def check_referenced_files(data: Any, loc: Locator, base_dir: Callable[[Path], str]) -> list[Diagnostic]:
    """The signing files must exist by build time; missing ones are reported now, as warnings,
    because a check often runs where the (secret) key is not present."""
    out = []
    signature = data.get("signature") if isinstance(data, dict) else None
    if isinstance(signature, dict):
        for name in ("certificate", "key"):
            value = signature.get(name)
            if isinstance(value, str) and value:
                full = os.path.join(base_dir(("signature", name)), value)
                if not os.path.isfile(full):
                    out.append(diagnostic(loc, ("signature", name), f"file {value!r} not found (looked at {full})",
                                          "the build needs it: create it, or fix the path (relative to the manifest)",
                                          severity="warning"))
    return out


def manifest_dir(path: str) -> str:
    return os.getcwd() if path == "-" else os.path.dirname(os.path.abspath(path))


@dataclass(frozen=True, slots=True)
class CheckResult:
    file: str
    diagnostics: tuple[Diagnostic, ...]
    doc: YamlDocument | None = None
    raw: bytes = b""

    @property
    def valid(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)


def check_file(path: str) -> CheckResult:
    """Every finding about one manifest file as written (no flags, no environment)."""
    try:
        raw = read_manifest(path)
        doc = parse_manifest(raw, path)
    except InvalidInput as e:
        return CheckResult(path, e.diagnostics)
    loc = FileLocator(doc, path)
    base = manifest_dir(path)
    found = sorted(doc.problems + validate(doc.data, loc) + check_referenced_files(doc.data, loc, lambda _: base),
                   key=lambda d: (d.line, d.col))
    return CheckResult(path, tuple(found), doc, raw)


def normalise(doc: YamlDocument) -> YamlDocument:
    """A copy with old source names (`supervisor`, `wrapper`) renamed, positions carried along."""
    out = copy.deepcopy(doc)
    sources = out.data.get("sources") if isinstance(out.data, dict) else None
    if isinstance(sources, dict):
        for old, new in RENAMED_SOURCES.items():
            if old in sources and new not in sources:
                sources[new] = sources.pop(old)
                _move(out.keys, ("sources", old), ("sources", new))
                _move(out.values, ("sources", old), ("sources", new))
                _move(out.sources, ("sources", old), ("sources", new))
    return out


def _move(table: dict[Path, T], old: Path, new: Path) -> None:
    if old in table:
        table[new] = table.pop(old)


def load_manifest(path: str = DEFAULT_MANIFEST) -> tuple[Manifest, tuple[Diagnostic, ...]]:
    """The manifest as written, or `InvalidInput` with every error. Returns the warnings too."""
    result = check_file(path)
    if not result.valid or result.doc is None:
        raise InvalidInput(diagnostics=[d for d in result.diagnostics if d.severity == "error"])
    data = normalise(result.doc).data
    warnings = tuple(d for d in result.diagnostics if d.severity == "warning")
    return Manifest.from_data(data, path=path, raw=result.raw), warnings


def get_path(data: Any, path: Path) -> tuple[bool, Any]:
    """(present, value) of a dotted path in nested maps."""
    node = data
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node
