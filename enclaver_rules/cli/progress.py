"""rich progress bars for transfers, on stderr; nothing is drawn when stderr is not a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from enclaver_rules.oci.store import Progress as Advance


class RichReporter:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def task(self, description: str, total: int | None) -> Advance:
        task_id = self.progress.add_task(description, total=total)
        self.tasks[description] = task_id
        return lambda n: self.progress.advance(task_id, n)

    def done(self, description: str) -> None:
        task_id = self.tasks.get(description)
        if task_id is not None:
            task = self.progress.tasks[task_id]
            self.progress.update(task_id, completed=task.total or task.completed)


class SilentReporter:
    """What a disabled rich `Progress` shows (nothing), without loading rich.progress (~8 ms of a
    start: `enclaver image push … | cat`, `-q`, CI logs)."""

    def task(self, description: str, total: int | None) -> Advance:
        return lambda n: None

    def done(self, description: str) -> None:
        pass


@contextmanager
def reporter(console: Console, enabled: bool = True) -> Iterator[RichReporter | SilentReporter]:
    if not enabled or not console.is_terminal:
        yield SilentReporter()
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=console, transient=True)
    with progress:
        yield RichReporter(progress)
