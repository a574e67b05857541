"""Progress bars for long work (rich), silent when disabled or when output is not a terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from collections.abc import Iterator


class _Bar:
    def __init__(self, progress, task_id):
        self._progress = progress
        self._task = task_id

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def update(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)


@contextmanager
def progress_bar(total: float | None, description: str, *, enabled: bool = True, unit: str = "") -> Iterator[_Bar]:
    if not enabled or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))
