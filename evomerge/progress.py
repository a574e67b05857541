"""Progress for long work: a rich bar at a terminal, plain lines in logs, nothing when disabled.

`progress_bar` is one bar for one job (a merge). `SearchProgress` follows a whole search through
its phases, because a search spends minutes outside its trials too: loading the sources and
tasks, scoring the parents as they are, and re-scoring the finalists on held-out tasks. At a
terminal it is one rich bar whose description follows the phase; when stderr is not a terminal
(logs, CI, Ray jobs) it writes one plain line per phase and one every `every` trials, since a
bar redrawn in place means nothing in a log file.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))


# The search's phases, in order, with what each counts.
PHASES = {
    "loading": "loading sources, model and tasks",
    "parents": "scoring the parents as they are",
    "calibration": "scoring the IRT calibration models on every item",
    "search": "search",
    "rescore": "re-scoring the front on every item",
    "selection": "held-out scores of the parents and finalists",
}


def plain_line_interval(total: int | None) -> int:
    """Trials between two plain progress lines: about ten lines per search, at least every trial."""
    return max(1, round(total / 10)) if total else 10


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class SearchProgress:
    """Where a search stands: the phase, trials done of the total, in flight, best, front, failures.

    `best` is a trial's mean over its objectives, the number the final table's "mean" column
    shows for it. Disabled (`enabled=False`): silent. `terminal` (default: whether `stream` is a
    terminal) chooses the rich bar or plain lines; `every` is the plain-line interval in trials.
    """

    def __init__(
        self,
        total: int | None,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        every: int | None = None,
    ):
        self.enabled = enabled
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.every = every or plain_line_interval(total)
        self.phase: str | None = None
        self.phase_total: int | None = None
        self.done = 0
        self.in_flight = 0
        self.failed = 0
        self.front = 0
        self.best_mean: float | None = None
        self.best_trial: int | None = None
        self._phase_started = time.monotonic()
        self._phase_done_at_start = 0
        self._last_line_at = 0
        self._rich = None
        self._task = None

    # -- phases -------------------------------------------------------------------------------
    def start_phase(self, phase: str, total: int | None = None, done: int = 0, detail: str = "") -> None:
        """Enter `phase` (one of PHASES) with `total` steps, `done` of them already finished."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r} (phases: {', '.join(PHASES)})")
        if self._task is not None and self.phase_total is None:  # a phase of unknown length ends complete
            self._rich.update(self._task, total=max(self.done, 1), completed=max(self.done, 1))
        self.phase, self.phase_total, self.done = phase, total, done
        self._phase_started = time.monotonic()
        self._phase_done_at_start = done
        self._last_line_at = done
        if not self.enabled:
            return
        description = PHASES[phase] + (f" ({detail})" if detail else "")
        if self.terminal:  # one bar per phase: the finished phases stay on screen above
            if self._task is not None:
                self._rich.update(self._task, status="")
            self._task = self._bar().add_task(description, total=total, completed=done, status=self._status())
        else:
            counted = f": {done}/{total}" if total is not None else ""
            self._line(f"{description}{counted}")

    def advance(self, amount: int = 1) -> None:
        """`amount` more steps of the current phase finished."""
        self.done += amount
        if not self.enabled:
            return
        if self.terminal:
            self._bar().update(self._task, advance=amount, status=self._status())
        elif self.phase == "search":
            if self.done - self._last_line_at >= self.every or (self.total is not None and self.done >= self.total):
                self._last_line_at = self.done
                self._line(self._search_line())
        elif self.phase_total is not None and self.done >= self.phase_total:
            self._line(f"{PHASES[self.phase]}: {self.done}/{self.phase_total} done")

    def update(
        self,
        *,
        in_flight: int | None = None,
        failed: int | None = None,
        front: int | None = None,
        best: tuple[int, float] | None = None,
    ) -> None:
        """New counts (no step finished): trials in flight, failed, front size, best (trial, mean)."""
        if in_flight is not None:
            self.in_flight = in_flight
        if failed is not None:
            self.failed = failed
        if front is not None:
            self.front = front
        if best is not None:
            self.best_trial, self.best_mean = best
        if self.enabled and self.terminal and self._rich is not None:
            self._rich.update(self._task, status=self._status())

    def close(self) -> None:
        """Stop the bar (its last state stays on screen); a later phase starts a new one below."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
            self._task = None

    # -- text -----------------------------------------------------------------------------------
    def _status(self, separator: str = "  ") -> str:
        if self.phase != "search":
            return ""
        best = f"best {self.best_mean:.3f} (trial {self.best_trial})" if self.best_mean is not None else "best -"
        return separator.join([f"in flight {self.in_flight}", best, f"front {self.front}", f"failed {self.failed}"])

    def _search_line(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        elapsed = time.monotonic() - self._phase_started
        text = f"search: {self.done}{total} trials, {self._status(', ')}, {_duration(elapsed)} elapsed"
        finished_here = self.done - self._phase_done_at_start
        if self.total is not None and finished_here > 0 and self.done < self.total:
            text += f", eta {_duration(elapsed / finished_here * (self.total - self.done))}"
        return text

    def _line(self, text: str) -> None:
        print(f"evomerge: {text}", file=self.stream, flush=True)

    def _bar(self):
        if self._rich is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._rich = Progress(
                SpinnerColumn(finished_text="[green]✓[/]"),
                TextColumn("{task.description}"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(file=self.stream, force_terminal=True),
                transient=False,
            )
            self._rich.start()
        return self._rich
