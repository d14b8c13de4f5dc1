"""`enclaver manifest check` and `enclaver manifest explain`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import add_json, command, command_group
from enclaver_rules.errors import Diagnostic, InvalidInput
from enclaver_rules.manifest import DEFAULT_MANIFEST

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output

CHECK_CODES = {
    ExitCode.OK: "every file is valid (warnings allowed, unless --strict)",
    ExitCode.INVALID_INPUT: "at least one file is invalid or unreadable",
}
EXPLAIN_CODES = {
    ExitCode.OK: "explained every file",
    ExitCode.INVALID_INPUT: "a file is invalid (its errors are printed)",
}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    group = command_group(commands, common, "manifest", "check and explain enclaver.yaml files")
    check = command(
        group, common, "check", help="validate manifests and report every problem", codes=CHECK_CODES, run=run_check,
        description="Validate each manifest against the schema and enclaver's rules, reporting every problem "
                    "as FILE:LINE:COL: field: problem — fix. Flags and ENC_* variables are not applied: this "
                    "checks the files as written (see `enclaver config show` for effective values).")
    check.add_argument("files", nargs="*", metavar="FILE", default=[DEFAULT_MANIFEST],
                       help=f"manifests to check (default: ./{DEFAULT_MANIFEST}; '-' reads stdin)")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    add_json(check)
    explain_cmd = command(
        group, common, "explain", help="say in plain words what a manifest allows", codes=EXPLAIN_CODES,
        run=run_explain,
        description="Describe what each manifest runs, what can reach it, what it can reach, and its resources.")
    explain_cmd.add_argument("files", nargs="*", metavar="FILE", default=[DEFAULT_MANIFEST], help="manifests to explain")
    add_json(explain_cmd)


def run_check(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    from enclaver_rules.manifest import check_file

    results = [check_file(f) for f in args.files]

    def failed(r: object) -> bool:
        diags = r.diagnostics  # type: ignore[attr-defined]
        return any(d.severity == "error" or (args.strict and d.severity == "warning") for d in diags)

    if args.json:
        out.json({"files": [{"file": r.file, "valid": not failed(r),
                             "name": r.doc.data.get("name") if r.doc and isinstance(r.doc.data, dict) else None,
                             "diagnostics": [d.to_json() for d in r.diagnostics]} for r in results]})
    else:
        for r in results:
            for d in r.diagnostics:
                out.diagnostic(d, to_stdout=True)
            errors = sum(d.severity == "error" for d in r.diagnostics)
            warnings = len(r.diagnostics) - errors
            if failed(r):
                counts = f"{errors} error{'s' * (errors != 1)}" + (f", {warnings} warning{'s' * (warnings != 1)}" if warnings else "")
                out.line(Text(f"{r.file}: invalid ({counts})", style="bold red"))
            elif not out.quiet:
                name = r.doc.data.get("name") if r.doc else ""
                extra = f" ({warnings} warning{'s' * (warnings != 1)})" if warnings else ""
                out.line(Text(f"{r.file}: valid — {name}{extra}", style="green"))
    return ExitCode.INVALID_INPUT if any(failed(r) for r in results) else ExitCode.OK


def run_explain(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    from enclaver_rules.manifest import load_manifest
    from enclaver_rules.manifest.explain import explain, render_text

    explained = []
    problems: list[Diagnostic] = []
    for f in args.files:
        try:
            manifest, warnings = load_manifest(f)
        except InvalidInput as e:
            problems.extend(e.diagnostics)
            continue
        for w in warnings:
            out.diagnostic(w)
        explained.append((f, manifest))
    if args.json:
        out.json({"manifests": [{"file": f, "name": m.name, "explanation": [
            {"topic": r.topic, "text": r.text, "notes": list(r.notes)} for r in explain(m)]} for f, m in explained]})
    else:
        for _, m in explained:
            title, *rest = render_text(m)
            out.line(Text(title, style="bold"))
            for line in rest:
                out.line(Text(line, style="dim" if line.lstrip().startswith("·") else ""))
            out.line("")
    if problems:
        raise InvalidInput(diagnostics=problems)
    return ExitCode.OK
