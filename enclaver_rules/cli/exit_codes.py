"""Exit codes of every `enclaver` command: one table, documented here and generated into the README."""

from __future__ import annotations

from enum import IntEnum

from enclaver_rules.errors import EnclaverError, InvalidInput


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    INVALID_INPUT = 2
    INTERNAL_ERROR = 3
    INTERRUPTED = 130

    @property
    def doc(self) -> str:
        return _DOCS[self]


_DOCS = {
    ExitCode.OK: "Success. A check found no errors (warnings allowed); a test found everything allowed.",
    ExitCode.FAILURE: "The command ran and its answer is no (a destination is denied), or an operation failed.",
    ExitCode.INVALID_INPUT: "Invalid input: a manifest, flag, `ENC_*` variable or argument is wrong. Nothing was done.",
    ExitCode.INTERNAL_ERROR: "A bug in enclaver. Run again with `--debug` and report the traceback.",
    ExitCode.INTERRUPTED: "Interrupted (Ctrl-C).",
}


def code_for(error: BaseException) -> ExitCode:
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(error, InvalidInput):
        return ExitCode.INVALID_INPUT
    if isinstance(error, EnclaverError):
        return ExitCode.FAILURE
    return ExitCode.INTERNAL_ERROR
