"""Where output goes: data on stdout, messages for people on stderr.

rich draws colour only on a terminal and never when NO_COLOR is set; `--json` output bypasses
rich entirely so it is exactly one JSON document.

The last line of defence for secrets: every line, note, diagnostic, JSON document and log record
printed here goes through `enclaver_rules.redact` first, whatever code produced it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO

from rich.console import Console
from rich.text import Text

from enclaver_rules import redact
from enclaver_rules.errors import Diagnostic

JSON_FORMAT_VERSION = 1


def _console(stream: TextIO) -> Console:
    # soft_wrap: a diagnostic stays on one line, whatever the terminal width, so it stays greppable.
    # NO_COLOR (no-color.org: set and not empty) turns off every escape code, bold included.
    plain = bool(os.environ.get("NO_COLOR"))
    return Console(file=stream, soft_wrap=True, highlight=False, color_system=None if plain else "auto")


@dataclass
class Output:
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False

    def __post_init__(self) -> None:
        self.out = _console(self.stdout)
        self.err = _console(self.stderr)

    def json(self, document: dict[str, Any]) -> None:
        """One JSON document on stdout, versioned so scripts can tell formats apart."""
        document = redact.value(document)
        self.stdout.write(json.dumps({"version": JSON_FORMAT_VERSION, **document}, indent=2, sort_keys=False) + "\n")

    def diagnostic(self, d: Diagnostic, *, to_stdout: bool = False) -> None:
        if d.severity == "warning" and self.quiet:
            return
        style = "yellow" if d.severity == "warning" else "red"
        text = redact.text(str(d) if d.file else f"{'warning' if d.severity == 'warning' else 'error'}: {d}")
        (self.out if to_stdout else self.err).print(Text(text, style=style))

    def line(self, text: str | Text, *, style: str = "") -> None:
        self.out.print(_redacted(text, style))

    def note(self, text: str, *, style: str = "") -> None:
        """A message for people (stderr); hidden by -q."""
        if not self.quiet:
            self.err.print(_redacted(text, style))

    def error_text(self, text: str, *, style: str = "") -> None:
        """Free text for stderr that no `Diagnostic` carries (an internal error, a traceback)."""
        self.err.print(Text(redact.text(text), style=style))


def _redacted(text: str | Text, style: str) -> Text:
    if isinstance(text, Text):
        clean = redact.text(text.plain)
        if clean == text.plain:
            return text
        return Text(clean, style=text.style)  # its spans no longer fit the text: one style for all
    return Text(redact.text(text), style=style)


class _LineHandler(logging.Handler):
    """One line per record, `warning: …` style, like compilers print; colour only on a terminal."""

    STYLES: ClassVar[dict[int, tuple[str, str]]] = {logging.DEBUG: ("debug: ", "dim"), logging.INFO: ("", ""), logging.WARNING: ("warning: ", "yellow"),
              logging.ERROR: ("error: ", "red"), logging.CRITICAL: ("error: ", "bold red")}

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        prefix, style = self.STYLES.get(record.levelno, ("", ""))
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self.console.print(Text(prefix + redact.text(message), style=style))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def setup_logging(verbosity: int, quiet: bool, console: Console) -> None:
    level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    handler = _LineHandler(console)
    root = logging.getLogger("enclaver")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Other libraries' warnings (urllib3, …) reached stderr through logging.lastResort, unredacted:
    # they go through the same redacting handler. Ours replaces the one an earlier call installed.
    third_party = _LineHandler(console)
    third_party.setLevel(max(level, logging.WARNING))
    top = logging.getLogger()
    top.handlers[:] = [h for h in top.handlers if not isinstance(h, _LineHandler)] + [third_party]
