"""`enclaver-run`: the entry point of enclaver's runtime image, and so of every release image built on it.

`docker run --device /dev/nitro_enclaves … RELEASE` runs this with no arguments: it starts the EIF in
/enclave with nitro-cli and runs the host side, exactly as `enclaver run /enclave` would, publishing
every ingress port on the same port (upstream's enclaver-run does the same; `-p` narrows it). The flags
are `enclaver run`'s (one parser, `cli.run.add_arguments`), minus the simulator's: there is no Docker
in here, and no store.

Why not the `enclaver` CLI itself: the binary is a static PyInstaller build made with odyn's pinned
build venv (`odyn_image/build.py`), which has no rich, docker, oras or doit. So output here is plain
lines through the same redaction, and errors become exit codes through the same `code_for`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import enclaver_rules
from enclaver_rules import redact
from enclaver_rules.cli.exit_codes import ExitCode, code_for
from enclaver_rules.cli.options import epilog
from enclaver_rules.cli.run import CODES, add_arguments, run_cmd
from enclaver_rules.errors import Diagnostic, EnclaverError

PROG = "enclaver-run"
RUNTIME_DESCRIPTION = (
    "The entry point of enclaver's runtime image (the base of release images): start the EIF in /enclave (or "
    "the EIF or directory given) with nitro-cli and run its host side, as `enclaver run` does on a Nitro host: "
    "allocator advice, the CID, the app's output on stdout and its status on stderr, ingress listeners (every "
    "ingress port on the same port unless -p is given), the egress connector, sd_notify, and the app's exit code. "
    "Needs `--device /dev/nitro_enclaves` and nitro-cli in the image (see the README: the runtime image).")


@dataclass
class PlainOutput:
    """The part of `cli.output.Output` that `run_cmd` uses, without rich: plain, redacted lines."""

    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False

    def note(self, text: str, *, style: str = "") -> None:
        if not self.quiet:
            self._err(text)

    def line(self, text: str, *, style: str = "") -> None:
        self.stdout.write(redact.text(str(text)) + "\n")
        self.stdout.flush()

    def diagnostic(self, d: Diagnostic, *, to_stdout: bool = False) -> None:
        text = str(d) if d.file else f"{'warning' if d.severity == 'warning' else 'error'}: {d}"
        (self.line if to_stdout else self._err)(text)

    def error_text(self, text: str, *, style: str = "") -> None:
        self._err(text)

    def _err(self, text: str) -> None:
        self.stderr.write(redact.text(text) + "\n")
        self.stderr.flush()


class _Redacting(logging.Formatter):
    """Log lines pass through the same redaction as every other line (a credential in an error text)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact.text(super().format(record))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=RUNTIME_DESCRIPTION, epilog=epilog(CODES),  # type: ignore[arg-type]
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} (enclaver {enclaver_rules.__version__})")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr (the app's output stays)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail on stderr (-vv: debug)")
    add_arguments(parser, runtime=True)
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = PlainOutput(stdout or sys.stdout, stderr or sys.stderr)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help/--version (0) or a usage error (2)
        return int(e.code or 0)
    out.quiet = args.quiet
    handler = logging.StreamHandler(out.stderr)
    handler.setFormatter(_Redacting(f"{PROG}: %(levelname)s: %(message)s"))
    logging.basicConfig(handlers=[handler], force=True,
                        level=logging.ERROR if args.quiet else [logging.WARNING, logging.INFO,
                                                                 logging.DEBUG][min(args.verbose, 2)])
    try:
        return int(run_cmd(args, out))  # type: ignore[arg-type]  # PlainOutput is the part of Output it uses
    except EnclaverError as e:
        for d in e.diagnostics:
            out.diagnostic(d)
        return code_for(e)
    except KeyboardInterrupt:
        out.note("interrupted")
        return ExitCode.INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last line of defence, redacted like every other line
        out.error_text(f"internal error: {type(e).__name__}: {e}")
        return ExitCode.INTERNAL_ERROR


def entry() -> Any:
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
