"""Schema validation that reports *every* problem as FILE:LINE:COL: field: problem — fix.

jsonschema finds the problems; this module turns each into a sentence a person can act on,
located through a `Locator` so the same code serves a file (line and column) and values that
came from flags or `ENC_*` variables (the flag or variable named instead).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from enclaver_rules.errors import Diagnostic
from enclaver_rules.manifest import schema as sch
from enclaver_rules.manifest._yaml import Path, YamlDocument, format_path

if TYPE_CHECKING:  # a type only: jsonschema loads when a manifest is validated (schema.validator)
    from jsonschema import ValidationError


class Locator(Protocol):
    """Where a path's value came from, and how it was written there."""

    def locate(self, path: Path, *, key: bool = False) -> tuple[str, int, int]: ...

    def written(self, path: Path) -> str | None: ...


@dataclass(slots=True)
class FileLocator:
    """Positions in one YAML file."""

    doc: YamlDocument
    filename: str

    def locate(self, path: Path, *, key: bool = False) -> tuple[str, int, int]:
        p = self.doc.position(path, prefer_key=key)
        return self.filename, p.line, p.col

    def written(self, path: Path) -> str | None:
        return self.doc.sources.get(path)


@dataclass(slots=True)
class OverlayLocator:
    """A file's positions, except for paths whose value a flag or variable replaced."""

    base: Locator
    overrides: dict[Path, tuple[str, str]] = field(default_factory=dict)  # path -> (source, raw text)

    def locate(self, path: Path, *, key: bool = False) -> tuple[str, int, int]:
        for depth in range(len(path), 0, -1):
            hit = self.overrides.get(path[:depth])
            if hit:
                return hit[0], 0, 0
        return self.base.locate(path, key=key)

    def written(self, path: Path) -> str | None:
        hit = self.overrides.get(path)
        return hit[1] if hit else self.base.written(path)


def diagnostic(loc: Locator, path: Path, message: str, fix: str, *, key: bool = False,
               severity: str = "error") -> Diagnostic:
    file, line, col = loc.locate(path, key=key)
    return Diagnostic(message, file, line, col, format_path(path), fix, severity)  # type: ignore[arg-type]


# Keys people reach for that v1 spells differently.
_KNOWN_MISTAKES: dict[Path, str] = {
    ("image",): "the app image is `sources.app` (and the output tag `target`); upstream's early `image:` key is not part of v1",
    ("policy",): "egress rules go under `egress.allow` / `egress.deny`",
    ("resources",): "resources are `defaults.cpu_count` and `defaults.memory_mb`",
}


def schema_diagnostics(data: Any, loc: Locator) -> list[Diagnostic]:
    """Every schema violation in `data`, sorted by position, each with a fix."""
    out: list[Diagnostic] = []
    for error in sch.validator().iter_errors(data):
        out.extend(d for d in _explain(error, loc) if d not in out)
    return sorted(out, key=lambda d: (d.file, d.line, d.col, d.field))


def _shown(loc: Locator, path: Path, value: Any) -> str:
    written = loc.written(path)
    if written is not None:
        return repr(written) if isinstance(value, str) else written
    return json.dumps(value)


def _yaml_type(value: Any) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "text",
        list: "a list", dict: "a map", type(None): "nothing",
    }.get(type(value), type(value).__name__)


_EXPECTED = {"integer": "a whole number", "string": "text", "array": "a list", "object": "a map",
             "number": "a number", "boolean": "true or false"}


def _fix(error: ValidationError, default: str) -> str:
    return str(sch.resolve_ref(error.schema).get("x-enclaver-fix", default)) if isinstance(error.schema, dict) else default


def _explain(error: ValidationError, loc: Locator) -> Iterable[Diagnostic]:
    path: Path = tuple(error.absolute_path)
    kind = error.validator
    value: Any = error.instance
    node: dict[str, Any] = dict(error.schema) if isinstance(error.schema, dict) else {}
    expected: Any = error.validator_value
    if kind == "additionalProperties":
        allowed = set(node.get("properties", {}))
        for extra in sorted(k for k in value if k not in allowed):
            message, fix = _unknown_key(path, extra, sorted(allowed))
            yield diagnostic(loc, path + (extra,), message, fix, key=True)
        return
    if kind == "required":
        for missing in [k for k in expected if k not in value and repr(k) in error.message]:
            child = sch.resolve_ref(node.get("properties", {}).get(missing, {}))
            yield diagnostic(loc, path, f"missing required key `{missing}`", _add_fix(path, missing, child), key=True)
        return
    if "propertyNames" in error.relative_schema_path:  # reported on the map, about one of its keys
        yield diagnostic(loc, path + (value,), f"{value!r} is not a valid key here", _fix(error, "rename it"), key=True)
        return
    shown = _shown(loc, path, value)
    if kind == "type":
        wanted = _EXPECTED.get(str(expected), str(expected))
        if value is None:
            yield diagnostic(loc, path, "has no value", f"give {wanted}, or remove the key", key=True)
            return
        fix = _fix(error, f"write {wanted}")
        if expected == "integer" and isinstance(value, str) and value.strip().isdigit():
            fix = f"remove the quotes: {value.strip()}"
        elif expected == "array" and not isinstance(value, (dict, list)):
            fix = f"make it a list, e.g. `[{shown}]` or one `- item` per line"
        yield diagnostic(loc, path, f"expected {wanted}, got {_yaml_type(value)} {shown}", fix)
        return
    if kind == "const":
        yield diagnostic(loc, path, f"{shown} is not supported", _fix(error, f"write {expected!r}"))
        return
    if kind in ("minimum", "maximum"):
        word = "less than the minimum" if kind == "minimum" else "more than the maximum"
        yield diagnostic(loc, path, f"{shown} is {word} {expected}", _fix(error, "change the value"))
        return
    if kind == "enum":
        choices = ", ".join(str(c) for c in expected)
        yield diagnostic(loc, path, f"{shown} is not one of: {choices}", _fix(error, f"use one of: {choices}"))
        return
    if kind == "minLength":
        yield diagnostic(loc, path, "must not be empty", _fix(error, "give a value or remove the key"))
        return
    if kind == "pattern":
        if value == "":
            return  # minLength already says "must not be empty"
        yield diagnostic(loc, path, f"{shown} is not valid here", _fix(error, "check the value"))
        return
    yield diagnostic(loc, path, error.message, _fix(error, "see the manifest reference in README.md"))


def _add_fix(path: Path, missing: str, child: dict[str, Any]) -> str:
    examples = child.get("examples")
    where = f" under `{format_path(path)}:`" if path else ""
    if examples:
        example = examples[0]
        if isinstance(example, dict):
            inner = ", ".join(f"{k}: {v}" for k, v in example.items())
            return f"add `{missing}:` with {inner}{where}"
        return f"add `{missing}: {example}`{where}"
    return f"add `{missing}:`{where}"


def _known_paths() -> dict[str, list[str]]:
    """Leaf and section names → their full dotted paths, for 'did you mean' across levels."""
    index: dict[str, list[str]] = {}
    for spec in sch.fields(include_sections=True):
        if spec.path and not spec.deprecated:
            index.setdefault(spec.path[-1], []).append(spec.key)
    for spec in sch.fields():
        if spec.path == ("ingress",):
            for name in sch.allowed_keys(("ingress", 0)):
                index.setdefault(name, []).append(f"ingress[].{name}")
    return index


def _unknown_key(path: Path, key: str, allowed: list[str]) -> tuple[str, str]:
    message = f"unknown key {key!r}"
    if (path + (key,)) in _KNOWN_MISTAKES:
        return message, _KNOWN_MISTAKES[path + (key,)]
    close = difflib.get_close_matches(key.lower(), allowed, n=1, cutoff=0.6)
    if close:
        return message, f"did you mean {close[0]!r}?"
    here = format_path(path)
    index = _known_paths()
    elsewhere = [p for p in index.get(key.lower(), []) if p.rsplit(".", 1)[0] != here]
    if elsewhere:
        parent = elsewhere[0].rsplit(".", 1)[0] if "." in elsewhere[0] else "the top level"
        return message, f"did you mean `{elsewhere[0]}`? move it under `{parent}:`"
    close = difflib.get_close_matches(key.lower(), list(index), n=1, cutoff=0.75)
    if close:
        return message, f"did you mean `{index[close[0]][0]}`?"
    listing = ", ".join(allowed) if allowed else "nothing"
    return message, f"remove it; allowed {'here' if path else 'at the top level'}: {listing}"
