"""The worker pool interface: where candidates are merged and scored, as the search loop sees it.

The loop never asks which pool it has. It submits a genome while `can_submit()`, takes finished
candidates back with `wait_any()` (in any order, matched by ticket), and scores the reference
models with `score_reference()`. A pool runs up to `size` candidates at once; a worker that dies
is restarted by the pool (`recovering()` is true meanwhile) and its candidate comes back as an
outcome with `worker_died` set, so the loop can retry that genome once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from evomerge.evaluate.protocol import ItemIds, ItemScores, Margins, Scores
    from evomerge.genome.protocol import Genome
    from evomerge.workers.candidate import CandidateResult


@dataclass
class TrialOutcome:
    """What came back for one submitted candidate: a result, or the error that stopped it."""

    ticket: int
    result: CandidateResult | None = None
    error: BaseException | None = None
    worker_died: bool = False


class WorkerPool(Protocol):
    @property
    def size(self) -> int:
        """Candidates that can run at once (live workers)."""
        ...

    @property
    def name(self) -> str:
        """What the trial store records as the trial's worker."""
        ...

    @property
    def genome(self) -> Genome: ...

    @property
    def has_selection(self) -> bool:
        """Whether finalists can be scored on the selection split (an objective has a selection_task)."""
        ...

    def can_submit(self) -> bool: ...

    def recovering(self) -> bool:
        """A dead worker is being restarted: wait_any will report when it is back."""
        ...

    def submit(self, params: Mapping[str, Any], split: str = "search", **how: Any) -> int:
        """Start merging and scoring one genome on `split`; returns its ticket.

        `how`: `CandidateWorker.evaluate`'s options: `items` (successive halving: only these docs
        per leaf task), `per_item=True` (every item, each one's values), `estimator=IrtCalibration`.
        """
        ...

    def wait_any(self, timeout: float | None = None) -> TrialOutcome | None:
        """The next finished candidate; None on timeout or when only a worker's recovery finished."""
        ...

    def score_reference(self, name: str, split: str) -> Scores:
        """Scores of a source model as it is (a parent or the base)."""
        ...

    def score_reference_items(self, name: str, split: str) -> tuple[Scores, ItemScores]:
        """`score_reference` with each item's values (only an estimator's calibration asks)."""
        ...

    def score_reference_margins(self, name: str, split: str, metrics: dict[str, str]) -> tuple[Scores, Margins]:
        """`score_reference` with each item's answer margin on the tasks in `metrics` (task ->
        metric): only successive halving's `order: margin` asks."""
        ...

    def item_ids(self, split: str = "search") -> ItemIds:
        """Every doc id each leaf task scores at full budget (needed only when eval.fidelity is set)."""
        ...

    def close(self) -> None: ...
