"""optuna's RDBStorage, with the parameters of one trial written in one transaction.

optuna writes every `trial.suggest_*` on its own: a session, a SELECT of the trial, an INSERT and
a COMMIT per parameter, ~0.5 ms each on SQLite, so 38 genes cost ~20 ms a trial. Inside
`BatchingRDBStorage.batched_params()` the parameters are kept in memory instead (the Trial object
and optuna's cache see each one at once, as before) and written together, in one transaction,
when the block ends: normally or by an exception. The search loop wraps `genome.suggest(trial)`
in it, so every parameter is in the database before the candidate is evaluated and long before
the trial is told; a finished trial has every parameter in optuna's tables, as optuna-dashboard
and a resumed study expect. A process killed inside the block leaves a RUNNING trial without
parameters, which a resumed search fails (it had not been evaluated yet).

Outside the block, and in any other thread, it is the plain RDBStorage. The same code path runs
on every database SQLAlchemy and optuna support (SQLite, PostgreSQL, MySQL).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import sqlalchemy
from optuna import distributions
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from sqlalchemy.exc import IntegrityError

# (trial_id, name, internal value, distribution, the study's earlier distribution of that name or None)
_Pending = tuple[int, str, float, distributions.BaseDistribution, "distributions.BaseDistribution | None"]


class BatchingRDBStorage(RDBStorage):
    """RDBStorage whose `batched_params()` block writes the suggested parameters in one transaction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._local = threading.local()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._local = threading.local()

    @contextmanager
    def batched_params(self) -> Iterator[None]:
        """Keep the parameters set in this thread in memory; write them all when the block ends."""
        if getattr(self._local, "pending", None) is not None:  # nested: the outer block writes
            yield
            return
        self._local.pending = []
        try:
            yield
        finally:
            pending, self._local.pending = self._local.pending, None
            if pending:
                self._write_params(pending)

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: distributions.BaseDistribution,
        previous_distribution: distributions.BaseDistribution | None,
    ) -> None:
        pending = getattr(self._local, "pending", None)
        if pending is None:
            super()._set_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)
            return
        pending.append((trial_id, param_name, param_value_internal, distribution, previous_distribution))

    def _write_params(self, pending: list[_Pending]) -> None:
        try:
            self._write_params_at_once(pending)
        except IntegrityError:
            # A row that is already there (another process wrote the same parameter): what
            # optuna does, one parameter at a time, skipping the ones that exist.
            for trial_id, name, value, distribution, previous in pending:
                super()._set_trial_param(trial_id, name, value, distribution, previous)

    def _write_params_at_once(self, pending: list[_Pending]) -> None:
        """The same checks and rows as RDBStorage._set_trial_param, in one session and one commit."""
        with _create_scoped_session(self.scoped_session) as session:
            trials: dict[int, Any] = {}
            known: dict[tuple[int, str], distributions.BaseDistribution | None] = {}
            rows = []
            for trial_id, name, value, distribution, previous in pending:
                trial = trials.get(trial_id)
                if trial is None:
                    trial = trials[trial_id] = models.TrialModel.find_or_raise_by_id(trial_id, session)
                    self.check_trial_is_updatable(trial_id, trial.state)
                if previous is None:
                    key = (trial.study_id, name)
                    if key not in known:
                        record = (
                            session.query(models.TrialParamModel)
                            .join(models.TrialModel)
                            .filter(models.TrialModel.study_id == trial.study_id)
                            .filter(models.TrialParamModel.param_name == name)
                            .first()
                        )
                        known[key] = None if record is None else distributions.json_to_distribution(record.distribution_json)
                    previous = known[key]
                if previous is not None:
                    distributions.check_distribution_compatibility(previous, distribution)
                rows.append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": value,
                        "distribution_json": distributions.distribution_to_json(distribution),
                    }
                )
            session.execute(sqlalchemy.insert(models.TrialParamModel), rows)  # one executemany


def batched_params(study: optuna.Study):
    """`study`'s storage's batched_params() block, or a block that does nothing for other storages."""
    storage = getattr(study, "_storage", None)
    backend = getattr(storage, "_backend", storage)  # optuna wraps an RDBStorage in a cache
    if isinstance(backend, BatchingRDBStorage):
        return backend.batched_params()
    return _nothing()


@contextmanager
def _nothing() -> Iterator[None]:
    yield
