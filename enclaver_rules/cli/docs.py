"""Generate the README's reference tables from the code, so the docs cannot drift from it.

    python -m enclaver_rules.cli.docs README.md          # rewrite the generated sections
    python -m enclaver_rules.cli.docs --check README.md  # exit 1 if they are stale (a test runs this)

A generated section sits between `<!-- BEGIN GENERATED: name -->` and `<!-- END GENERATED: name -->`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.manifest import schema as sch
from enclaver_rules.manifest.config import Setting, settings

WIDTH = 100


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def exit_codes() -> str:
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {int(c)} | {_cell(c.doc)} |" for c in ExitCode]
    return "\n".join(rows)


def _commands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                has_sub = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if has_sub:
                    yield from _commands(sub)
                else:
                    yield sub.prog, sub


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = parser.formatter_class(prog=parser.prog, width=WIDTH)  # type: ignore[call-arg]
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            meta = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
            names = ", ".join(f"`{o}{meta}`" for o in action.option_strings)
        else:
            names = f"`{action.metavar or action.dest}`"
        rows.append(f"| {names} | {_cell(action.help or '')} |")
    return rows


def commands() -> str:
    from enclaver_rules.cli.main import build_parser

    out = []
    for prog, parser in _commands(build_parser()):
        out += [f"### `{prog}`", "", parser.description or "", "", "```", _usage(parser), "```", ""]
        out += ["| option | meaning |", "|---|---|", *_option_rows(parser), ""]
        codes = parser.get_default("exit_codes") or {}
        out += ["| exit code | when |", "|---|---|", *[f"| {int(c)} | {_cell(t)} |" for c, t in codes.items()], ""]
    out.append("Every command also accepts `-v`/`--verbose`, `-q`/`--quiet` and `--debug`, before or after its name.")
    return "\n".join(out)


def _rows(node: dict[str, Any], key: str, required: bool, parent: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(field, schema node, required?) for every field, descending into maps and lists of maps."""
    node = sch.resolve_ref(node)
    if key:
        yield key, node, ("yes" if not parent else f"in `{parent}`") if required else "no"
    props = node.get("properties")
    items = sch.resolve_ref(node.get("items", {}))
    if not props and items.get("properties"):
        node, props, key = items, items["properties"], f"{key}[]"
    for name, child in (props or {}).items():
        yield from _rows(child, f"{key}.{name}" if key else name, name in node.get("required", ()), key)


def manifest_fields() -> str:
    by_key: dict[str, Setting] = {s.key: s for s in settings()}
    rows = ["| field | type | required | default | flag / variable | meaning |", "|---|---|---|---|---|---|"]
    for key, node, required in _rows(sch.schema(), "", True, ""):
        spec = sch.FieldSpec(tuple(key.split(".")), node, required == "yes")
        setting = by_key.get(key)
        override = f"`{setting.flag}` / `{setting.env}`" if setting and setting.overridable else "manifest only"
        kind = "map" if node.get("properties") else "map of strings" if node.get("type") == "object" else spec.type
        notes = spec.description
        if spec.deprecated:
            notes += " *(deprecated)*"
            override = "—"
        default = f"`{spec.default}`" if spec.default is not None else "—"
        rows.append(f"| `{key}` | {kind} | {required} | {default} | {override} | {_cell(notes)} |")
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "exit-codes": exit_codes,
    "commands": commands,
    "manifest-fields": manifest_fields,
}
_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: ([a-z-]+) -->\n).*?(<!-- END GENERATED: \2 -->)", re.S)


def render(text: str) -> str:
    def fill(match: re.Match[str]) -> str:
        return f"{match.group(1)}{SECTIONS[match.group(2)]()}\n{match.group(3)}"

    return _BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enclaver_rules.cli.docs")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    parser.add_argument("file")
    args = parser.parse_args(argv)
    with open(args.file, encoding="utf-8") as f:
        current = f.read()
    wanted = render(current)
    missing = set(SECTIONS) - set(m.group(2) for m in _BLOCK.finditer(current))
    if missing:
        print(f"{args.file}: no generated section for {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    if args.check:
        if wanted != current:
            print(f"{args.file}: generated sections are stale — run: python -m enclaver_rules.cli.docs {args.file}",
                  file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        with open(args.file, "w", encoding="utf-8") as f:
            f.write(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
