"""YAML → plain data, remembering where every key and value was written.

`yaml.safe_load` loses positions and silently keeps the last of two equal keys. We compose the
node graph with PyYAML's SafeLoader (so scalars resolve exactly as `safe_load` would) and build
the data ourselves, recording each node's start so every diagnostic can say FILE:LINE:COL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from enclaver_rules.errors import Diagnostic, InvalidInput

Path = tuple[str | int, ...]

#: Aliases can make a small file expand into a huge tree; no real manifest comes near this.
MAX_NODES = 20_000
#: The plain YAML types. Any other tag (`!!python/...`, `!custom`) is refused, never constructed.
_STANDARD_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "timestamp", "merge")
)


@dataclass(frozen=True, slots=True)
class Position:
    line: int  # 1-based
    col: int  # 1-based


@dataclass(slots=True)
class YamlDocument:
    """Parsed data plus, for every path, where its key and its value start in the file."""

    data: Any
    keys: dict[Path, Position] = field(default_factory=dict)
    values: dict[Path, Position] = field(default_factory=dict)
    sources: dict[Path, str] = field(default_factory=dict)  # the scalar text as written
    #: Structural problems (duplicate or non-text keys). Reported with, not instead of, the
    #: schema's findings: the data holds the first of two equal keys.
    problems: list[Diagnostic] = field(default_factory=list)

    def position(self, path: Path, *, prefer_key: bool = False) -> Position:
        """Best position for `path`: the value (or key), else the nearest ancestor, else 1:1."""
        probe = path
        while True:
            first, second = (self.keys, self.values) if prefer_key else (self.values, self.keys)
            if probe in first:
                return first[probe]
            if probe in second:
                return second[probe]
            if not probe:
                return Position(1, 1)
            probe = probe[:-1]


def _pos(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


class _Builder:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.loader = yaml.SafeLoader("")
        self.doc = YamlDocument(None)
        self.problems: list[Diagnostic] = []
        self.visited = 0

    def problem(self, node: yaml.Node, path: Path, message: str, fix: str) -> None:
        p = _pos(node)
        self.problems.append(Diagnostic(message, self.filename, p.line, p.col, format_path(path), fix))

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.visited += 1
        if self.visited > MAX_NODES:
            raise InvalidInput(
                f"the document expands to more than {MAX_NODES} nodes",
                file=self.filename,
                fix="remove the YAML aliases (*name) that repeat large parts of the file",
            )
        self.doc.values.setdefault(path, _pos(node))
        if node.tag not in _STANDARD_TAGS:
            self.problem(node, path, f"YAML tag {node.tag!r} is not allowed in a manifest",
                         "remove the tag; write plain text, numbers, lists and maps")
            return None
        if isinstance(node, yaml.ScalarNode):
            self.doc.sources[path] = node.value
            try:
                return self.loader.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError) as e:
                self.problem(node, path, f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}: {e}",
                             "remove the explicit tag, or fix the value")
                return node.value
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.MappingNode)
        self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys in place
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, path, "a key must be a plain name", "write the key as text")
                continue
            key = self.loader.construct_object(key_node)
            if not isinstance(key, str):
                # `yes:`/`on:` become booleans and `8001:` an int in YAML 1.1: say so instead of
                # reporting a baffling "unknown key True".
                self.problem(key_node, path, f"key {key_node.value!r} is read as {type(key).__name__}, not text",
                             f"quote it: \"{key_node.value}\"")
                key = key_node.value
            child = path + (key,)
            if key in out:
                first = self.doc.keys[child]
                self.problem(key_node, child, f"duplicate key (first set at line {first.line})",
                             "remove one of the two")
                continue
            self.doc.keys[child] = _pos(key_node)
            out[key] = self.build(value_node, child)
        return out


def load_yaml(text: str, filename: str) -> YamlDocument:
    """Parse one YAML document; raise `InvalidInput` with every structural problem found."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        what = e.problem or e.context or "invalid YAML"
        raise InvalidInput(f"invalid YAML: {what}", file=filename, line=line, col=col,
                           fix=_yaml_fix(what)) from None
    except yaml.YAMLError as e:  # reader errors (bad bytes) carry no mark
        raise InvalidInput(f"invalid YAML: {e}", file=filename, fix="save the file as UTF-8 text") from None
    if len(nodes) > 1:
        second = _pos(nodes[1])
        raise InvalidInput("the file holds more than one YAML document", file=filename, line=second.line,
                           col=second.col, fix="keep one manifest per file; remove the '---' separator")
    builder = _Builder(filename)
    if nodes:
        builder.doc.data = builder.build(nodes[0], ())
    builder.doc.problems = builder.problems
    return builder.doc


def _yaml_fix(problem: str) -> str:
    if "\\t" in problem or "tab" in problem:
        return "indent with spaces, not tabs"
    if "mapping values are not allowed" in problem:
        return "quote values that contain ': ', and check the indentation"
    if "could not find expected ':'" in problem:
        return "each key needs a ':' after it; check the indentation of the lines around"
    return "check the indentation and quoting near this position"


def format_path(path: Path) -> str:
    """`('egress', 'allow', 2)` → `egress.allow[2]`; the root is the empty string."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
