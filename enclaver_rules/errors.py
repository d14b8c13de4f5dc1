"""The one error type users see, and the diagnostics it carries.

Every failure a user can fix is an `EnclaverError` naming where (file, line, column), what (the
field), what is wrong and how to fix it. Only `enclaver_rules.cli` turns these into text and exit
codes; library code raises and never prints. Subclasses exist only to select an exit code.

A diagnostic never carries a secret: its text is passed through `enclaver_rules.redact` when it is
made, so a password in a quoted reference, a key in a quoted value or a registry's echo of our
`Authorization` header is gone before anything can print, log or store it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from enclaver_rules import redact

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding about an input, located as precisely as the input allows.

    `file` is a path, or a pseudo-source such as ``ENC_DEFAULTS_MEMORY_MB`` or ``--target`` when
    the value came from the environment or the command line. `line`/`col` are 1-based and 0 when
    unknown. `field` is a dotted path into the manifest (``egress.allow[2]``) or empty.
    """

    message: str
    file: str = ""
    line: int = 0
    col: int = 0
    field: str = ""
    fix: str = ""
    severity: Severity = "error"

    def __post_init__(self) -> None:
        for name in ("message", "file", "field", "fix"):
            text = getattr(self, name)
            clean = redact.text(text)
            if clean != text:
                object.__setattr__(self, name, clean)

    def location(self) -> str:
        if not self.file:
            return ""
        if self.line:
            return f"{self.file}:{self.line}:{self.col or 1}"
        return self.file

    def __str__(self) -> str:
        parts = [p for p in (self.location(),) if p]
        if self.severity == "warning":
            parts.append("warning")
        if self.field:
            parts.append(self.field)
        text = ": ".join(parts + [self.message]) if parts else self.message
        return f"{text} — {self.fix}" if self.fix else text

    def to_json(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "field": self.field,
            "message": self.message,
            "fix": self.fix,
        }


class EnclaverError(Exception):
    """A failure the user can act on. Carries one or more diagnostics; the CLI prints them all."""

    def __init__(
        self,
        message: str = "",
        *,
        file: str = "",
        line: int = 0,
        col: int = 0,
        field: str = "",
        fix: str = "",
        diagnostics: tuple[Diagnostic, ...] | list[Diagnostic] = (),
    ) -> None:
        diags = tuple(diagnostics)
        if message:
            diags = (Diagnostic(message, file, line, col, field, fix),) + diags
        if not diags:
            raise ValueError("EnclaverError needs a message or diagnostics")
        self.diagnostics: tuple[Diagnostic, ...] = diags
        super().__init__("\n".join(str(d) for d in diags))

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")


class InvalidInput(EnclaverError):
    """The input (manifest, flag, variable, argument) is wrong; nothing was attempted."""


class OperationFailed(EnclaverError):
    """The input was fine but the operation could not be carried out (a service, the disk)."""
