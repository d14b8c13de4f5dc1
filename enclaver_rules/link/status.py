"""The status stream (vsock 17000): one JSON line per state, readable by upstream's host side.

Upstream writes `signal` as a name and does not escape `error`, so its own host side drops those
lines and hangs (compat notes §4, §6 items 1–2). We write valid JSON always, `signal` as the
integer the host expects, with the name alongside.
"""

from __future__ import annotations

import contextlib
import json
import signal as signals
from dataclasses import dataclass
from typing import Literal, TypeGuard

State = Literal["starting", "running", "exited", "signaled", "fatal"]
MAX_LINE = 1024  # upstream's host reads lines up to this size
_STATES = ("starting", "running", "exited", "signaled", "fatal")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Status:
    state: State
    code: int | None = None  # exited
    signal: int | None = None  # signaled
    error: str | None = None  # fatal

    def line(self) -> bytes:
        doc: dict[str, object] = {"status": self.state}
        if self.state == "exited":
            doc["code"] = self.code
        elif self.state == "signaled":
            doc["signal"] = self.signal
            with contextlib.suppress(ValueError):
                doc["name"] = signals.Signals(self.signal or 0).name
        elif self.state == "fatal":
            error = self.error or ""
            doc["error"] = error
            while len(json.dumps(doc)) >= MAX_LINE:  # a 1 KiB line reader must get the whole line
                error = error[: len(error) * 3 // 4]
                doc["error"] = error + "…"
        return json.dumps(doc, ensure_ascii=True).encode() + b"\n"

    @property
    def final(self) -> bool:
        return self.state in ("exited", "signaled", "fatal")

    @classmethod
    def parse(cls, line: bytes) -> Status:
        """A status line, checked field by field: ValueError (never another exception) for anything
        that is not one, so a host side can report a garbled line instead of crashing on it. Only
        the field the state needs is kept; fields it does not know are ignored (upstream's too)."""
        try:
            doc = json.loads(line)
        except RecursionError:
            raise ValueError("status line is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past the digit limit
            raise ValueError(f"status line is not JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("status"), str) or doc["status"] not in _STATES:
            raise ValueError("status line without a known status")
        state: State = doc["status"]
        if state == "exited":
            code = doc.get("code")
            if not _is_int(code):
                raise ValueError("an exited status needs an integer code")
            return cls(state, code=code)
        if state == "signaled":
            signal = doc.get("signal")
            if isinstance(signal, str):  # upstream odyn writes the name
                member = signals.Signals.__members__.get(signal)
                signal = int(member) if member is not None else 0
            if not _is_int(signal):
                raise ValueError("a signaled status needs a signal number or name")
            return cls(state, signal=signal)
        if state == "fatal":
            error = doc.get("error")
            if error is not None and not isinstance(error, str):
                raise ValueError("a fatal status's error must be a string")
            return cls(state, error=error or "")  # what `line` writes for no error
        return cls(state)

    def exit_code(self) -> int:
        """What the host side exits with (upstream's table: app code, 107 signaled, 108 fatal)."""
        if self.state == "exited":
            return (self.code or 0) & 0xFF
        return 107 if self.state == "signaled" else 108
