"""What the search loop, export and the CLI need of a trial store (`TrialStore` is the one implementation).

Study management (`evomerge studies`: rename, copy, delete, the lease) works on the SQL tables
themselves and keeps using `TrialStore`; everything else reads and records through these two
interfaces. Every method may raise `StorageError`; a store is used by one thread at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from evomerge.store.states import Split, TrialStatus
from evomerge.store.trial_store import StudyInfo, TrialRecord

Scores = Mapping[str, Mapping[str, float]]  # task -> metric -> value


class TrialReader(Protocol):
    """A study's trials and scores as recorded: what the front, export and `evomerge front` read."""

    def study_info(self, study: str) -> StudyInfo | None: ...

    def trials(self, study: str, *, status: TrialStatus | str | None = None) -> list[TrialRecord]: ...

    def trial(self, study: str, number: int) -> TrialRecord | None: ...

    def scores(self, study: str, split: Split | str) -> dict[int, dict[str, dict[str, float]]]:
        """trial number -> task -> metric -> value."""
        ...

    def references(self, study: str, split: Split | str) -> dict[str, dict[str, dict[str, float]]]:
        """reference model name -> task -> metric -> value."""
        ...

    def close(self) -> None: ...


class TrialRecorder(TrialReader, Protocol):
    """The reader plus the writes of the search loop. A trial is started, then finished or failed;
    a completed trial is recorded before optuna is told, so its row is the durable truth."""

    def save_study(
        self,
        study: str,
        *,
        space_yaml: str,
        space_path: str,
        directions: list[str],
        objective_names: list[str],
        objective_weights: list[float],
        uid: str | None = None,
    ) -> None: ...

    def start_trial(self, study: str, number: int, genome: dict, *, worker: str | None = None) -> None: ...

    def finish_trial(
        self,
        study: str,
        number: int,
        *,
        values: list[float],
        plan_yaml: str,
        merge_seconds: float,
        eval_seconds: float,
        device: str,
        weights_hash: str,
        scores: Scores | None = None,
    ) -> None: ...

    def fail_trial(self, study: str, number: int, failure: str) -> None: ...

    def record_scores(self, study: str, number: int, split: Split | str, scores: Scores) -> None: ...

    def record_reference(self, study: str, name: str, path: str, split: Split | str, scores: Scores) -> None: ...
