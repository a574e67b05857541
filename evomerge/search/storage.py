"""optuna's RDBStorage, with the parameters of one trial written in one transaction.

optuna writes every `trial.suggest_*` on its own: a session, a SELECT of the trial, an INSERT and
a COMMIT per parameter, so a trial pays one transaction per gene. Inside
`BatchingRDBStorage.batched_params()` the parameters are kept in memory instead (the Trial object
and optuna's cache see each one at once, as with the plain storage) and written together, in one transaction,
when the block ends: normally or by an exception. The search loop wraps `genome.suggest(trial)`
in it, so every parameter is in the database before the candidate is evaluated and long before
the trial is told; a finished trial has every parameter in optuna's tables, as optuna-dashboard
and a resumed study expect. A process killed inside the block leaves a RUNNING trial without
parameters, which a resumed search fails (it had not been evaluated yet).

It leans on optuna's private storage internals, so `make_storage` uses it only on the optuna
releases in TESTED_OPTUNA (the pinned one); any other optuna gets its own RDBStorage, slower
per trial and otherwise the same. Outside the block, and in any other thread, it writes like the
plain RDBStorage. The same code path runs on every database SQLAlchemy and optuna support (SQLite, PostgreSQL, MySQL).

Reads: optuna re-reads a running trial from the database several times a trial (`ask`, the
sampler's two syncs, `tell`), each time through ORM objects and lazy or select-in loads. Here
`get_trial` and `_get_trials` run the same queries (same filters, one snapshot) as SQLAlchemy Core
selects and hand the rows to optuna's own FrozenTrial builder: no ORM objects per read, the
same FrozenTrials (tests/test_search_storage.py compares them with RDBStorage's).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Container, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import optuna
import sqlalchemy
from optuna import distributions
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError, OperationalError

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

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attributes of one trial in one transaction: the same check and rows as
        RDBStorage.set_trial_user_attr, which commits each attribute on its own."""
        if not attrs:
            return
        table = models.TrialUserAttributeModel.__table__
        with _create_scoped_session(self.scoped_session, True) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            self.check_trial_is_updatable(trial_id, trial.state)
            # replace: delete the keys that are there, insert all (dialect-independent upsert)
            session.execute(sqlalchemy.delete(table).where(table.c.trial_id == trial_id, table.c.key.in_(list(attrs))))
            session.execute(
                sqlalchemy.insert(table),
                [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()],
            )

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
                        known[key] = (
                            None if record is None else distributions.json_to_distribution(record.distribution_json)
                        )
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

    # -- reads ------------------------------------------------------------------------------
    def get_trial(self, trial_id: int) -> FrozenTrial:
        trials = self._read_trials(models.TrialModel.__table__.c.trial_id == trial_id)
        if not trials:
            raise KeyError(models.NOT_FOUND_MSG)
        return trials[0]

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        """RDBStorage._get_trials: the study's trials in `states`, of ids > trial_id_greater_than or
        in included_trial_ids (those up to trial_id_greater_than), by trial id."""
        trial = models.TrialModel.__table__.c
        included = {i for i in included_trial_ids if i <= trial_id_greater_than}
        where = [trial.study_id == study_id]
        if states is not None:
            where.append(trial.state.in_(list(states)))  # type: ignore[call-overload]
        wanted = list(where)
        if included and trial_id_greater_than > -1:
            wanted.append(sqlalchemy.or_(trial.trial_id.in_(included), trial.trial_id > trial_id_greater_than))
        elif trial_id_greater_than > -1:
            wanted.append(trial.trial_id > trial_id_greater_than)
        try:
            return self._read_trials(*wanted, study_id=study_id)
        except OperationalError:
            # Likely more ids than the database allows in one IN (as RDBStorage): filter here.
            return [
                t
                for t in self._read_trials(*where, study_id=study_id)
                if t._trial_id in included or t._trial_id > trial_id_greater_than
            ]

    def _read_trials(self, *where: Any, study_id: int | None = None) -> list[FrozenTrial]:
        """The trials matching `where`, read on one connection and built by RDBStorage's own builder."""
        trial = models.TrialModel.__table__
        with self.engine.connect() as conn:
            if study_id is not None:
                study = models.StudyModel.__table__
                if (
                    conn.execute(sqlalchemy.select(study.c.study_id).where(study.c.study_id == study_id)).first()
                    is None
                ):
                    raise KeyError(models.NOT_FOUND_MSG)
            rows = conn.execute(sqlalchemy.select(trial).where(*where).order_by(trial.c.trial_id)).all()
            if not rows:
                return []
            found = {}
            for row in rows:
                record = SimpleNamespace(trial_id=row.trial_id, number=row.number, state=row.state)
                if _UTC_COLUMNS:
                    record._datetime_start_utc, record._datetime_complete_utc = (
                        row.datetime_start,
                        row.datetime_complete,
                    )
                    record.datetime_start = models.TrialModel.datetime_start.fget(record)  # type: ignore[attr-defined]
                    record.datetime_complete = models.TrialModel.datetime_complete.fget(record)  # type: ignore[attr-defined]
                else:
                    record.datetime_start, record.datetime_complete = row.datetime_start, row.datetime_complete
                for name, _, _ in _RELATED:
                    setattr(record, name, [])
                found[row.trial_id] = record
            ids = sqlalchemy.select(trial.c.trial_id).where(*where).scalar_subquery()
            for name, table, key in _RELATED:
                related = sqlalchemy.select(table).where(table.c.trial_id.in_(ids)).order_by(table.c[key])
                for row in conn.execute(related):
                    if row.trial_id in found:
                        getattr(found[row.trial_id], name).append(row)
        return [self._build_frozen_trial_from_trial_model(record) for record in found.values()]  # type: ignore[arg-type]


_RELATED = (  # FrozenTrial builder's attribute, table, primary key (the builder sorts params by it)
    ("params", models.TrialParamModel.__table__, "param_id"),
    ("values", models.TrialValueModel.__table__, "trial_value_id"),
    ("user_attributes", models.TrialUserAttributeModel.__table__, "trial_user_attribute_id"),
    ("system_attributes", models.TrialSystemAttributeModel.__table__, "trial_system_attribute_id"),
    ("intermediate_values", models.TrialIntermediateValueModel.__table__, "trial_intermediate_value_id"),
)
_UTC_COLUMNS = hasattr(models.TrialModel, "_datetime_start_utc")  # optuna >= 5 stores naive UTC


# The optuna releases whose private storage internals (models, session helper, FrozenTrial
# builder, _set_trial_param/_get_trials signatures) this module was written and tested against.
TESTED_OPTUNA = ("5.0",)


def supported(version: str | None = None) -> bool:
    """Whether this optuna is one the fast storage was tested with (else: plain RDBStorage)."""
    version = optuna.__version__ if version is None else version
    return ".".join(version.split(".")[:2]) in TESTED_OPTUNA


def make_storage(url: str, **kwargs: Any) -> RDBStorage:
    """BatchingRDBStorage on a tested optuna, optuna's own RDBStorage on any other."""
    return (BatchingRDBStorage if supported() else RDBStorage)(url, **kwargs)


def batched_params(study: optuna.Study):
    """`study`'s storage's batched_params() block, or a block that does nothing for other storages."""
    storage = getattr(study, "_storage", None)
    backend = getattr(storage, "_backend", storage)  # optuna wraps an RDBStorage in a cache
    if isinstance(backend, BatchingRDBStorage):
        return backend.batched_params()
    return _nothing()


def close_storage(study: optuna.Study) -> None:
    """Return the connections of `study`'s database storage. A library call that returns with its
    SQLite connections open leaves them to the garbage collector, whose closing of the last one
    checkpoints the write-ahead log into the database file at some later moment."""
    storage = getattr(study, "_storage", None)
    backend = getattr(storage, "_backend", storage)
    engine = getattr(backend, "engine", None)
    if engine is not None:
        engine.dispose()


@contextmanager
def _nothing() -> Iterator[None]:
    yield
