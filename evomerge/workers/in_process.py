"""One CandidateWorker in the driver process (workers: 1): each candidate is scored at submit time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evomerge.workers.protocol import TrialOutcome

if TYPE_CHECKING:
    from evomerge.evaluate.protocol import ItemIds, ItemScores, Margins, Scores
    from evomerge.genome.protocol import Genome
    from evomerge.workers.candidate import CandidateWorker


class InProcessPool:
    """The candidate is evaluated at submit time; wait_any hands back the finished outcome.

    `restore_threads`: torch's thread count to put back on close (make_pool changed it).
    """

    def __init__(self, worker: CandidateWorker, *, restore_threads: int | None = None):
        self.worker = worker
        self.size = 1
        self._done: list[TrialOutcome] = []
        self._ticket = 0
        self._restore_threads = restore_threads

    @property
    def genome(self) -> Genome:
        return self.worker.genome

    @property
    def has_selection(self) -> bool:
        return self.worker.selection_evaluator is not None

    @property
    def name(self) -> str:
        return self.worker.name

    def can_submit(self) -> bool:
        return not self._done

    def recovering(self) -> bool:
        return False

    def submit(self, params: Mapping[str, Any], split: str = "search", **how: Any) -> int:
        self._ticket += 1
        try:
            outcome = TrialOutcome(self._ticket, result=self.worker.evaluate(params, split, **how))
        except Exception as error:  # the loop fails the trial, never the study
            outcome = TrialOutcome(self._ticket, error=error)
        self._done.append(outcome)
        return self._ticket

    def wait_any(self, timeout: float | None = None) -> TrialOutcome | None:
        return self._done.pop(0) if self._done else None

    def score_reference(self, name: str, split: str) -> Scores:
        return self.worker.score_reference(name, split)

    def score_reference_items(self, name: str, split: str) -> tuple[Scores, ItemScores]:
        return self.worker.score_reference_items(name, split)

    def score_reference_margins(self, name: str, split: str, metrics: dict[str, str]) -> tuple[Scores, Margins]:
        return self.worker.score_reference_margins(name, split, metrics)

    def item_ids(self, split: str = "search") -> ItemIds:
        return self.worker.item_ids(split)

    def close(self) -> None:
        if self._restore_threads is not None:
            import torch

            torch.set_num_threads(self._restore_threads)
            self._restore_threads = None
