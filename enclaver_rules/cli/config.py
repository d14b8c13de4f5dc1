"""`enclaver config show`: every effective value and where it came from.

Values are printed as `manifest.config.shown` gives them: key material (`signature.key` holding the
key itself) as its kind and fingerprint, credentials in a reference masked. The source column says
where the value came from, so a redacted value can still be found and checked.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import (
    add_json,
    add_manifest_file,
    add_overrides,
    command,
    command_group,
    overrides_from,
)
from enclaver_rules.manifest import resolve
from enclaver_rules.manifest.config import report_conflicts

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output

SHOW_CODES = {
    ExitCode.OK: "the effective configuration is valid",
    ExitCode.INVALID_INPUT: "it is not: the manifest, a flag or an ENC_* variable is wrong (values are still shown)",
}
HEADER = ("setting", "value", "origin", "source")
_ORIGIN_STYLE = {"flag": "bold magenta", "env": "bold cyan", "file": "", "default": "dim"}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    group = command_group(commands, common, "config", "show effective configuration")
    show = command(
        group, common, "show", help="print every effective value with its origin", codes=SHOW_CODES, run=run_show,
        description="Print every manifest value as enclaver will use it, with its origin: flag, env (ENC_*), "
                    "file (with line and column) or default. Precedence: flag > env > file > default. A value "
                    "set by more than one source is logged once as a conflict.")
    add_manifest_file(show)
    add_json(show)
    add_overrides(show)


def _cell(value: object) -> str:
    return "—" if value is None else value if isinstance(value, str) else json.dumps(value)


def run_show(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    config = resolve(args.file, overrides_from(args), os.environ)
    report_conflicts(config)
    if args.json:
        out.json({"file": config.file, "valid": not config.errors,
                  "settings": {v.setting.key: v.to_json() for v in config.values},
                  "diagnostics": [d.to_json() for d in config.diagnostics]})
    else:
        rows = [(v.setting.key, _cell(v.shown.value), v.origin + ("" if v.setting.overridable else "*"), v.source, v.origin)
                for v in config.values]
        widths = [max(len(r[i]) for r in rows + [HEADER]) for i in range(3)]
        out.line(Text("  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=False)) + "  " + HEADER[3], style="bold"))
        for key, value, origin, source, kind in rows:
            out.line(Text.assemble(key.ljust(widths[0]), "  ", value.ljust(widths[1]), "  ",
                                   (origin.ljust(widths[2]), _ORIGIN_STYLE[kind]), "  ", (source, "dim")))
        out.note("* set in the manifest only (enclave policy and identity); precedence: flag > env > file > default")
    for d in config.diagnostics:
        out.diagnostic(d)
    return ExitCode.INVALID_INPUT if config.errors else ExitCode.OK
