"""`enclaver`: argument parsing, dispatch, and the one place errors become text and exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import TextIO

import enclaver_rules
from enclaver_rules.cli import attestation as attestation_cmd
from enclaver_rules.cli import attestation_sim  # noqa: F401 - adds `attestation ca` and `attestation sim-nsm`
from enclaver_rules.cli import build as build_cmd
from enclaver_rules.cli import config as config_cmd
from enclaver_rules.cli import egress as egress_cmd
from enclaver_rules.cli import eif as eif_cmd
from enclaver_rules.cli import image as image_cmd
from enclaver_rules.cli import imds as imds_cmd
from enclaver_rules.cli import init as init_cmd
from enclaver_rules.cli import k8s as k8s_cmd
from enclaver_rules.cli import kms as kms_cmd
from enclaver_rules.cli import lock as lock_cmd
from enclaver_rules.cli import manifest as manifest_cmd
from enclaver_rules.cli import reproduce as reproduce_cmd
from enclaver_rules.cli import run as run_cmd
from enclaver_rules.cli import trust as trust_cmd
from enclaver_rules.cli.exit_codes import ExitCode, code_for
from enclaver_rules.cli.options import add_common
from enclaver_rules.errors import EnclaverError

# Start-up: every command module is imported here, since the parser is made whole (`--help`, the
# README's command docs); each keeps its heavy imports (rich, the OCI client, jsonschema, asyncio, ...)
# inside the functions that use them. tests/test_startup.py checks what `import` of this module loads.

COMMAND_GROUPS = (init_cmd, manifest_cmd, config_cmd, egress_cmd, image_cmd, eif_cmd, build_cmd, lock_cmd, trust_cmd, reproduce_cmd, run_cmd, attestation_cmd,
                  kms_cmd, imds_cmd, k8s_cmd)
log = logging.getLogger("enclaver")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_common(common)
    parser = argparse.ArgumentParser(
        prog="enclaver",
        description="Build, run and prove AWS Nitro Enclave images from ordinary container images.",
        epilog="exit codes:\n" + "\n".join(f"  {int(c):<3} {c.doc}" for c in ExitCode),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"enclaver {enclaver_rules.__version__}")
    add_common(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.add_parser(commands, common)
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2)
        return int(e.code or 0)
    from enclaver_rules.cli.output import Output, setup_logging  # rich: only once a command runs

    out = Output(stdout, stderr, quiet=args.quiet)
    setup_logging(args.verbose, args.quiet, out.err)
    try:
        return int(args.func(args, out))
    except EnclaverError as e:
        for d in e.diagnostics:
            out.diagnostic(d)
        if args.debug:
            out.error_text(traceback.format_exc())
        return code_for(e)
    except KeyboardInterrupt:
        out.note("interrupted")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `enclaver … | head`: the reader left; not an error worth a traceback
        return ExitCode.OK
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback unless asked
        # secrets: the message and traceback pass through the redaction like every other line
        out.error_text(f"internal error: {type(e).__name__}: {e}", style="red")
        if args.debug:
            out.error_text(traceback.format_exc())
        else:
            out.error_text("this is a bug in enclaver: run again with --debug and report the traceback")
        return ExitCode.INTERNAL_ERROR


def entrypoint() -> None:
    sys.exit(main())
