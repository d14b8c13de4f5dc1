"""YAML → plain data, remembering where every key and value was written.

`yaml.safe_load` loses positions and silently keeps the last of two equal keys. We compose the
node graph with PyYAML's SafeLoader (so scalars resolve exactly as `safe_load` would) and build
the data ourselves, recording each node's start so every diagnostic can say FILE:LINE:COL.

A manifest may come from anyone (a pull request), so every way YAML has to make a small file
expensive is bounded, and each is an `InvalidInput` at a position, never a Python error:
nesting deeper than MAX_DEPTH (PyYAML's composer recurses once per level; aliases can nest a
node in itself), more than MAX_NODES nodes once aliases and merges are expanded, and merge keys
(`<<`) are resolved here rather than by PyYAML's `flatten_mapping` (which recurses without bound,
raises on `<<: 5` and repeats merged keys exponentially): `<<` takes a map or a list of maps,
explicit keys win over merged ones and earlier maps over later ones, as YAML 1.1 says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from enclaver_rules.errors import Diagnostic, InvalidInput

Path = tuple[str | int, ...]

#: Aliases can make a small file expand into a huge tree; no real manifest comes near this.
MAX_NODES = 20_000
#: Nesting of lists and maps; a manifest needs about 5.
MAX_DEPTH = 32
_MERGE = "tag:yaml.org,2002:merge"
_VALUE = "tag:yaml.org,2002:value"  # a plain `=`: PyYAML reads it as the text "="
#: What PyYAML's constructors raise for a scalar that does not fit its explicit tag (`!!bool maybe`
#: is a KeyError, `!!timestamp 1` an AttributeError, `!!int x` a ValueError).
_CONSTRUCT_ERRORS = (yaml.YAMLError, ValueError, OverflowError, LookupError, AttributeError, TypeError)
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


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer stops at MAX_DEPTH levels (it recurses once per level)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, f"lists and maps nested more than {MAX_DEPTH} levels deep",
                                              mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Builder:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.loader = yaml.SafeLoader("")
        self.doc = YamlDocument(None)
        self.problems: list[Diagnostic] = []
        self.visited = 0
        #: merged maps' keys, by node id (the nodes live as long as the builder)
        self.flat: dict[int, dict[str, tuple[yaml.Node, yaml.Node]]] = {}

    def problem(self, node: yaml.Node, path: Path, message: str, fix: str) -> None:
        p = _pos(node)
        found = Diagnostic(message, self.filename, p.line, p.col, format_path(path), fix)
        if found not in self.problems:  # a merged map's problems would be found at each use
            self.problems.append(found)

    def count(self, node: yaml.Node, n: int = 1) -> None:
        self.visited += n
        if self.visited > MAX_NODES:
            p = _pos(node)
            raise InvalidInput(
                f"the document expands to more than {MAX_NODES} nodes",
                file=self.filename, line=p.line, col=p.col,
                fix="no manifest has this many values: remove the YAML aliases (*name) and merges (<<) that "
                    "repeat large parts of the file, or the bulk data",
            )

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.count(node)
        if len(path) >= MAX_DEPTH:  # only aliases get here: the composer stops deeper nesting
            p = _pos(node)
            raise InvalidInput(f"aliases nest lists and maps more than {MAX_DEPTH} levels deep", file=self.filename,
                               line=p.line, col=p.col, field=format_path(path[:3]) + "…",
                               fix="an alias (*name) must not be used inside its own anchor (&name), "
                                   "nor in long chains of aliases")
        self.doc.values.setdefault(path, _pos(node))
        if isinstance(node, yaml.ScalarNode) and node.tag == _VALUE:
            self.doc.sources[path] = node.value
            return node.value
        if node.tag not in _STANDARD_TAGS:
            self.problem(node, path, f"YAML tag {node.tag!r} is not allowed in a manifest",
                         "remove the tag; write plain text, numbers, lists and maps")
            return None
        if isinstance(node, yaml.ScalarNode):
            self.doc.sources[path] = node.value
            try:
                return self.loader.construct_object(node, deep=True)
            except _CONSTRUCT_ERRORS as e:
                self.problem(node, path, f"cannot read {node.value[:80]!r} as {node.tag.rsplit(':', 1)[-1]}: {e}",
                             "remove the explicit tag, or fix the value")
                return node.value
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.MappingNode)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.key(key_node, path, report=True)
            if key is None:
                continue
            child = path + (key,)
            if key in out:
                first = self.doc.keys[child]
                self.problem(key_node, child, f"duplicate key (first set at line {first.line})",
                             "remove one of the two")
                continue
            self.doc.keys[child] = _pos(key_node)
            out[key] = self.build(value_node, child)
        for key, (key_node, value_node) in self.merged(node, path, ()).items():
            if key not in out:  # explicit keys win over merged ones
                child = path + (key,)
                self.doc.keys[child] = _pos(key_node)
                out[key] = self.build(value_node, child)
        return out

    def key(self, node: yaml.Node, path: Path, *, report: bool) -> str | None:
        """A mapping key as text, or None (with a problem when `report`) when it cannot be one."""
        if not isinstance(node, yaml.ScalarNode):
            if report:
                self.problem(node, path, "a key must be a plain name", "write the key as text")
            return None
        if node.tag == _VALUE:
            return str(node.value)
        if node.tag not in _STANDARD_TAGS:
            if report:
                self.problem(node, path, f"YAML tag {node.tag!r} is not allowed in a manifest",
                             "remove the tag; write keys as plain text")
            return None
        try:
            key = self.loader.construct_object(node)
        except _CONSTRUCT_ERRORS as e:
            if report:
                self.problem(node, path, f"cannot read key {node.value[:80]!r}: {e}", "write the key as plain text")
            return None
        if not isinstance(key, str):
            # `yes:`/`on:` become booleans and `8001:` an int in YAML 1.1: say so instead of
            # reporting a baffling "unknown key True".
            if report:
                self.problem(node, path, f"key {node.value[:80]!r} is read as {type(key).__name__}, not text",
                             f"quote it: \"{node.value[:80]}\"")
            return str(node.value)
        return key

    def merged(self, node: yaml.MappingNode, path: Path,
               chain: tuple[int, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """What `node`'s merge keys bring in: key → (key node, value node), earlier maps first.
        Each map's own merges are resolved once (memoised), so repeating an alias cannot multiply
        the work; a map that merges itself, directly or not, is reported instead of followed."""
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE:
                continue
            if isinstance(value_node, yaml.MappingNode):
                sources = [value_node]
            elif isinstance(value_node, yaml.SequenceNode):
                sources = list(value_node.value)
            else:
                self.problem(value_node, path, "`<<` (merge) must be given a map or a list of maps, "
                             f"not {value_node.value[:40]!r}", "write `<<: *name` where `&name` marks a map")
                continue
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    self.problem(source, path, "`<<` (merge) must be given maps only",
                                 "every item of the list after `<<:` must be an alias of a map (*name)")
                    continue
                for key, pair in self.flattened(source, path, chain + (id(node),)).items():
                    out.setdefault(key, pair)
        return out

    def flattened(self, node: yaml.MappingNode, path: Path,
                  chain: tuple[int, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """All of a merged map's keys: its own, then those it merges."""
        if id(node) in self.flat:
            return self.flat[id(node)]
        if id(node) in chain or len(chain) >= MAX_DEPTH:
            self.problem(node, path, "`<<` (merge) merges a map into itself, or nests merges too deeply",
                         "merge only maps defined earlier that do not merge this one")
            return {}
        self.count(node, len(node.value))
        own: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE:
                key = self.key(key_node, path, report=False)
                if key is not None:
                    own.setdefault(key, (key_node, value_node))
        for key, pair in self.merged(node, path, chain).items():
            own.setdefault(key, pair)
        self.flat[id(node)] = own
        return own


def load_yaml(text: str, filename: str) -> YamlDocument:
    """Parse one YAML document; raise `InvalidInput` with every structural problem found."""
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
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
    if "nested more than" in problem:
        return "a manifest needs a few levels of lists and maps: check the brackets and the indentation"
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
