"""`enclaver egress test`: would the policy let these destinations out, and which rule decides?"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import add_json, add_manifest_file, command, command_group
from enclaver_rules.errors import Diagnostic, InvalidInput
from enclaver_rules.manifest import resolve

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output
    from enclaver_rules.policy import Destination, EgressPolicy

TEST_CODES = {
    ExitCode.OK: "every destination is allowed",
    ExitCode.FAILURE: "at least one destination is denied",
    ExitCode.INVALID_INPUT: "a destination, the manifest or a rule is invalid; nothing was tested",
}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    group = command_group(commands, common, "egress", "test the egress policy")
    test = command(
        group, common, "test", help="check destinations against the egress policy", codes=TEST_CODES, run=run_test,
        description="For each destination say whether the enclave may reach it and which rule decided. "
                    "DEST is host, host:port, ip, ip:port, an IPv6 address, or [v6]:port. The policy has no "
                    "port component: a port is accepted and shown, never checked. With --allow/--deny the "
                    "policy is exactly those rules and no manifest is read.")
    add_manifest_file(test)
    test.add_argument("destinations", nargs="+", metavar="DEST", help="destinations to test")
    test.add_argument("--allow", action="append", metavar="RULE", help="an allow rule (repeatable); skips the manifest")
    test.add_argument("--deny", action="append", metavar="RULE", help="a deny rule (repeatable); skips the manifest")
    add_json(test)


def _policy(args: argparse.Namespace) -> tuple[EgressPolicy, str]:
    from enclaver_rules.policy import EgressPolicy, review

    if args.allow or args.deny:
        allow, deny = args.allow or [], args.deny or []
        problems = [Diagnostic(f.message, file=f"--{f.list_name}", field=f"{f.list_name}[{f.index}]", fix=f.fix,
                               severity=f.severity) for f in review(allow, deny)]
        if any(p.severity == "error" for p in problems):
            raise InvalidInput(diagnostics=problems)
        return EgressPolicy.from_lists(allow, deny), "--allow/--deny"
    config = resolve(args.file, {}, os.environ)
    manifest = config.require_manifest()
    return manifest.egress.policy(), args.file


def run_test(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    from enclaver_rules.policy import PolicyError, parse_destination

    destinations: list[Destination] = []
    problems = []
    for text in args.destinations:
        try:
            destinations.append(parse_destination(text))
        except PolicyError as e:
            problems.append(Diagnostic(e.message, file="DEST", fix=e.fix))
    if problems:
        raise InvalidInput(diagnostics=problems)
    policy, source = _policy(args)
    decisions = [policy.decide(d) for d in destinations]
    if args.json:
        out.json({"policy": source, "enabled": policy.enabled,
                  "allowed": all(d.allowed for d in decisions),
                  "results": [d.to_json() for d in decisions]})
    else:
        width = max(len(d.destination.text) for d in decisions)
        for d in decisions:
            verdict = Text("allowed", style="green") if d.allowed else Text("denied ", style="bold red")
            parent = "  [the parent instance]" if d.destination.host == "host" else ""
            out.line(Text.assemble(verdict, f"  {d.destination.text:<{width}}  ", (d.reason, "dim"), parent))
    return ExitCode.OK if all(d.allowed for d in decisions) else ExitCode.FAILURE
