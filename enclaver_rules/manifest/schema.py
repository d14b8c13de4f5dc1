"""The manifest's JSON Schema (`schemas/enclaver.schema.json`) and what is derived from it.

The schema is the one source for validation, for the flag/variable registry (`x-enclaver-*`
annotations) and for the README's field reference, so the three cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "enclaver.schema.json"


@lru_cache(maxsize=1)
def schema_bytes() -> bytes:
    return resources.files("enclaver_rules.schemas").joinpath(SCHEMA_FILE).read_bytes()


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_bytes())
    return loaded


@lru_cache(maxsize=1)
def validator() -> Any:
    """The Draft 2020-12 validator (jsonschema is imported here: commands that never validate
    should not pay for it at start-up)."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema())


def resolve_ref(node: dict[str, Any]) -> dict[str, Any]:
    """Merge a local `$ref` (`#/$defs/x`) into the node that uses it (annotations of the node win)."""
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = schema()
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One documented manifest field (a leaf, or a list/map treated as one value)."""

    path: tuple[str, ...]
    node: dict[str, Any]
    required: bool

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def type(self) -> str:
        if "const" in self.node:
            return "string"
        if "enum" in self.node:
            return " | ".join(str(c) for c in self.node["enum"])
        t = self.node.get("type", "")
        if t == "array":
            items = resolve_ref(self.node.get("items", {}))
            return f"list of {items.get('type', 'value')}s" if items.get("type") != "object" else "list of maps"
        return str(t)

    @property
    def default(self) -> Any:
        return self.node.get("default")

    @property
    def description(self) -> str:
        return str(self.node.get("description", ""))

    @property
    def overridable(self) -> bool:
        return bool(self.node.get("x-enclaver-overridable"))

    @property
    def deprecated(self) -> bool:
        return bool(self.node.get("deprecated"))

    @property
    def unsupported(self) -> bool:
        return bool(self.node.get("x-enclaver-unsupported"))


def fields(include_sections: bool = False) -> Iterator[FieldSpec]:
    """Walk the schema in document order, yielding leaves (and sections when asked)."""

    def walk(node: dict[str, Any], path: tuple[str, ...], required: bool) -> Iterator[FieldSpec]:
        node = resolve_ref(node)
        props = node.get("properties")
        if props and node.get("type") == "object":
            if path and include_sections:
                yield FieldSpec(path, node, required)
            req = set(node.get("required", ()))
            for name, child in props.items():
                yield from walk(child, path + (name,), name in req)
            return
        yield FieldSpec(path, node, required)

    yield from walk(schema(), (), True)


def allowed_keys(path: tuple[str | int, ...]) -> list[str]:
    """Keys the schema allows in the mapping at `path` (list indices step into `items`)."""
    node = resolve_ref(schema())
    for part in path:
        if isinstance(part, int):
            node = resolve_ref(node.get("items", {}))
        else:
            node = resolve_ref(node.get("properties", {}).get(part, {}))
    return list(node.get("properties", {}))
