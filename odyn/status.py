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
from typing import Literal

State = Literal["starting", "running", "exited", "signaled", "fatal"]
MAX_LINE = 1024  # upstream's host reads lines up to this size


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
        try:
            doc = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"status line is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("status") not in ("starting", "running", "exited", "signaled", "fatal"):
            raise ValueError("status line without a known status")
        state = doc["status"]
        signal = doc.get("signal")
        if state == "signaled" and isinstance(signal, str):  # upstream odyn writes the name
            signal = int(getattr(signals.Signals, signal, 0))
        return cls(state, doc.get("code"), signal, doc.get("error"))

    def exit_code(self) -> int:
        """What the host side exits with (upstream's table: app code, 107 signaled, 108 fatal)."""
        if self.state == "exited":
            return (self.code or 0) & 0xFF
        return 107 if self.state == "signaled" else 108
