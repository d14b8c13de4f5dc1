"""Flag groups shared by several commands, defined once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.manifest import DEFAULT_MANIFEST, overridable_settings

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output


def add_common(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """-v/-q/--debug, accepted before or after the command (sub-parsers don't reset them)."""
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                       help="more detail (repeat for debug logs)")
    group.add_argument("-q", "--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
                       help="only errors and the command's data")
    group.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                       help="show tracebacks for errors")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def add_manifest_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", default=DEFAULT_MANIFEST, metavar="FILE",
                        help=f"the manifest (default: ./{DEFAULT_MANIFEST}; '-' reads stdin)")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """One flag per overridable manifest field; precedence: flag > ENC_* variable > file > default."""
    group = parser.add_argument_group(
        "manifest overrides", "flag > ENC_* variable > manifest > default; policy fields are set in the manifest only")
    for s in overridable_settings():
        metavar = "N" if s.spec.type == "integer" else "VALUE"
        group.add_argument(s.flag, dest=f"override_{s.dest}", metavar=metavar,
                           help=f"{s.spec.description} (or {s.env})")


def overrides_from(args: argparse.Namespace) -> dict[str, str | None]:
    return {s.key: getattr(args, f"override_{s.dest}", None) for s in overridable_settings()}


def epilog(codes: dict[ExitCode, str]) -> str:
    lines = ["exit codes:"] + [f"  {int(c):<3} {text}" for c, text in codes.items()]
    return "\n".join(lines)


Subparsers = argparse._SubParsersAction  # the type argparse returns from add_subparsers()


def command_group(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser, name: str,
                  help: str) -> Subparsers[argparse.ArgumentParser]:
    """`enclaver <name> COMMAND`: a group whose sub-commands do the work."""
    group = commands.add_parser(name, help=help, parents=[common])
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def command(group: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser, name: str, *, help: str,
            description: str, codes: dict[ExitCode, str], run: Callable[[argparse.Namespace, Output], int],
            ) -> argparse.ArgumentParser:
    """One command: help, description, its exit codes (shown in --help and the README), its handler.

    Callers add their own arguments, then `add_json` last, so `--json` sits at the end of every usage line."""
    parser = group.add_parser(name, parents=[common], help=help, description=description, epilog=epilog(codes),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run, exit_codes=codes)
    return parser
