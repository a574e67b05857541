"""TrialStore: what optuna does not keep about a trial, in the study's own database.

Optuna keeps params and objective values; we also keep the merge plan (as mergekit YAML), every
lm-eval score on every split, timings, the device, the merged weights' hash and why a trial
failed, plus the space file and the reference models, so `front` and `export` can rebuild
everything from the database alone.

Concurrency: every public write is one short transaction that commits before the method returns,
so a worker killed with SIGKILL never loses a trial it had reported. All writes are upserts, so
retrying one (after a lock timeout, or from a restarted driver) is harmless. On SQLite, writes
take the write lock up front (`BEGIN IMMEDIATE`) and wait on a busy timeout instead of failing
with "database is locked"; the journal mode is left as optuna and the user set it.

Opening a store writes nothing: the tables (and columns added since older databases) are created
by the first write, so `front` or `export` on a database that is not there creates no file, and
reads of a database without our tables are empty. Every database failure surfaces as a one-line
StorageError (evomerge/store/database.py).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, delete, func, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError

from evomerge.store.database import (  # display_url and tune_sqlite are imported from here too
    database_errors,
    display_url,
    make_engine,
    sqlite_path,
    use_wal,
)
from evomerge.store.states import Split, TrialStatus
from evomerge.store.tables import (
    STUDY_UID_ATTR,
    capped_table,
    item_orders_table,
    leases_table,
    metadata,
    reference_scores_table,
    references_table,
    rungs_table,
    scores_table,
    studies_table,
    trials_table,
)

RUNNING, COMPLETE, FAILED, PRUNED = TrialStatus.RUNNING, TrialStatus.COMPLETE, TrialStatus.FAILED, TrialStatus.PRUNED
STATUSES = tuple(TrialStatus)
SPLITS = tuple(Split)
DIRECTIONS = ("maximize", "minimize")

_WRITE_ATTEMPTS = 5  # a write that still meets a lock/deadlock error is retried this many times
_FAILURE_CHARS = 2000  # failure reasons are one line, at most this long

_T = TypeVar("_T")
# Every study's rows, in the order a delete or rename touches them.
STUDY_TABLES = (
    scores_table,
    rungs_table,
    capped_table,
    item_orders_table,
    reference_scores_table,
    references_table,
    trials_table,
    leases_table,
    studies_table,
)


def _database_call(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run a TrialStore method with database failures reported as one-line StorageErrors."""

    @functools.wraps(method)
    def call(self: TrialStore, *args: Any, **kwargs: Any) -> _T:
        with database_errors(self._url):
            return method(self, *args, **kwargs)

    return call


@dataclass(frozen=True)
class TrialRecord:
    study: str
    number: int  # optuna trial number
    status: TrialStatus
    genome: dict[str, Any]  # optuna params of the trial
    plan_yaml: str  # mergekit-compatible YAML reproducing the merge ("" while unknown)
    values: list[float] | None  # objective values (complete: told to optuna; pruned: at its last rung; else None)
    merge_seconds: float | None
    eval_seconds: float | None
    device: str | None
    weights_hash: str | None
    failure: str | None  # one-line reason when failed
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class StudyInfo:
    study: str
    uid: str | None  # the optuna study's STUDY_UID_ATTR when saved (None: written before uids)
    space_yaml: str  # the space file's text as given
    space_path: str
    directions: list[str]
    objective_names: list[str]
    objective_weights: list[float]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class OptunaStudy:
    """An optuna study in the same database, as evomerge sees it (read from optuna's tables)."""

    name: str
    study_id: int
    uid: str | None  # its STUDY_UID_ATTR system attr, None if evomerge never ran it
    states: dict[str, int]  # trial state name (COMPLETE, FAIL, RUNNING, WAITING, PRUNED) -> count


class TrialStore:
    """The evomerge tables beside an optuna study, at any SQLAlchemy URL.

    >>> store = TrialStore("sqlite:///study.db")      # same URL as optuna's storage
    >>> store.start_trial("s", 0, {"t": 0.5}, worker="w0")
    >>> store.finish_trial("s", 0, values=[0.61], plan_yaml=..., merge_seconds=1.2, ...)
    """

    def __init__(self, url: str, *, echo: bool = False):
        self._url = str(url)
        self._engine = make_engine(self._url, echo=echo)
        # Same pool; the option makes the SQLite begin hook take the write lock up front.
        self._writer = self._engine.execution_options(evomerge_write=True)
        # Opening writes nothing: the tables are created (and older ones migrated) before the
        # first write, so a read-only command never creates a database file or a table.
        self._ready_for_writes = False
        self._present: set[str] = set()  # our tables seen to exist (they are never dropped)
        self._uid_column: bool | None = None

    @property
    def url(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"TrialStore({display_url(self._url)!r})"

    @property
    def engine(self):
        """The store's SQLAlchemy engine (for the lease and other tables in this package)."""
        return self._engine

    def close(self) -> None:
        """Return the pooled connections; the store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> TrialStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- studies

    @_database_call
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
    ) -> None:
        """Insert or replace the study's description; `created_at` survives a replace.

        `uid`: the optuna study's STUDY_UID_ATTR, which ties these rows to that optuna study.
        """
        directions = [_direction(d) for d in directions]
        weights = [float(w) for w in objective_weights]
        if not len(directions) == len(objective_names) == len(weights):
            raise ValueError(
                f"study {study!r}: {len(directions)} directions, {len(objective_names)} "
                f"objective names and {len(weights)} weights; give one of each per objective"
            )
        now = _utcnow()
        row = {
            "study": study,
            "study_uid": uid,
            "space_yaml": space_yaml,
            "space_path": str(space_path),
            "directions": directions,
            "objective_names": [str(n) for n in objective_names],
            "objective_weights": weights,
            "created_at": now,
            "updated_at": now,
        }
        self._write(lambda conn: _upsert(conn, studies_table, [row], keep=("created_at",)))

    @_database_call
    def study_info(self, study: str) -> StudyInfo | None:
        def read(conn: Connection) -> Any:
            return (
                conn.execute(select(*self._study_columns(conn)).where(studies_table.c.study == study))
                .mappings()
                .first()
            )

        row = self._read((studies_table,), read, None)
        if row is None:
            return None
        return StudyInfo(
            study=row["study"],
            uid=row.get("study_uid"),
            space_yaml=row["space_yaml"],
            space_path=row["space_path"],
            directions=list(row["directions"]),
            objective_names=list(row["objective_names"]),
            objective_weights=[float(w) for w in row["objective_weights"]],
            created_at=_as_utc(row["created_at"]),
            updated_at=_as_utc(row["updated_at"]),
        )

    @_database_call
    def studies(self) -> list[str]:
        """Every study with a saved description or at least one trial, sorted by name."""

        def read(conn: Connection) -> set[str]:
            described = conn.execute(select(studies_table.c.study)).scalars().all()
            with_trials = conn.execute(select(trials_table.c.study).distinct()).scalars().all()
            return {*described, *with_trials}

        return sorted(self._read((studies_table, trials_table), read, set()))

    @_database_call
    def trial_counts(self) -> dict[str, dict[str, int]]:
        """study -> status -> number of trial rows, for every study with trials."""

        def read(conn: Connection) -> dict[str, dict[str, int]]:
            t = trials_table
            counts: dict[str, dict[str, int]] = {}
            for study, status, count in conn.execute(
                select(t.c.study, t.c.status, func.count()).group_by(t.c.study, t.c.status)
            ):
                counts.setdefault(study, {})[status] = int(count)
            return counts

        return self._read((trials_table,), read, {})

    @_database_call
    def delete_study(self, study: str, *, keep_lease: bool = False) -> int:
        """Remove every evomerge row of `study` (trials, scores, references, lease, description).

        Returns how many trial rows went. optuna's own study is not touched here. `keep_lease`:
        for the driver that holds the lease and clears rows a deleted namesake left.
        """

        def remove(conn: Connection) -> int:
            trials = conn.execute(
                select(func.count()).select_from(trials_table).where(trials_table.c.study == study)
            ).scalar_one()
            for table in STUDY_TABLES:
                if not (keep_lease and table is leases_table):
                    conn.execute(delete(table).where(table.c.study == study))
            return int(trials)

        if not self._readable(()):
            return 0
        return self._write(remove)

    def rename_rows(self, conn: Connection, old: str, new: str) -> None:
        """Inside a caller's write transaction: move every evomerge row of `old` to `new`."""
        for table in STUDY_TABLES:
            conn.execute(update(table).where(table.c.study == old).values(study=new))

    def copy_rows(self, conn: Connection, old: str, new: str, *, uid: str | None) -> None:
        """Inside a caller's write transaction: every evomerge row of `old` again under `new`
        (the lease stays behind; the description gets `uid`, the copy's optuna study uid)."""
        for table in STUDY_TABLES:
            if table is leases_table:
                continue
            rows = [dict(row) for row in conn.execute(select(table).where(table.c.study == old)).mappings()]
            for row in rows:
                row["study"] = new
                if table is studies_table:
                    row["study_uid"] = uid
            if rows:
                conn.execute(table.insert(), rows)

    @_database_call
    def optuna_studies(self) -> dict[str, OptunaStudy]:
        """The optuna studies in this database (read from optuna's own tables; none if it has none)."""

        def read(conn: Connection) -> dict[str, OptunaStudy]:
            tables = set(inspect(conn).get_table_names())
            if not {"studies", "trials", "study_system_attributes"} <= tables:
                return {}
            studies = conn.execute(text("SELECT study_id, study_name FROM studies")).all()
            uids = dict(
                conn.execute(
                    text("SELECT study_id, value_json FROM study_system_attributes WHERE key = :key"),
                    {"key": STUDY_UID_ATTR},
                ).all()
            )
            states: dict[int, dict[str, int]] = {}
            for study_id, state, count in conn.execute(
                text("SELECT study_id, state, COUNT(*) FROM trials GROUP BY study_id, state")
            ):
                states.setdefault(study_id, {})[_state_name(state)] = int(count)
            return {
                name: OptunaStudy(name, int(study_id), _json_string(uids.get(study_id)), states.get(study_id, {}))
                for study_id, name in studies
            }

        return self._read((), read, {})

    @_database_call
    def optuna_study_genes(self, study_id: int) -> tuple[list[str], dict[str, str]]:
        """An optuna study's directions (lower case) and each gene's latest distribution as
        optuna's JSON, read from optuna's tables without optuna (which would create them)."""

        def read(conn: Connection) -> tuple[list[str], dict[str, str]]:
            directions = [
                str(getattr(d, "name", d)).lower()
                for (d,) in conn.execute(
                    text("SELECT direction FROM study_directions WHERE study_id = :id ORDER BY objective"),
                    {"id": study_id},
                )
            ]
            genes = dict(
                conn.execute(
                    text(
                        "SELECT p.param_name, p.distribution_json FROM trial_params p JOIN trials t ON p.trial_id = t.trial_id "
                        "WHERE t.study_id = :id ORDER BY p.param_id"
                    ),
                    {"id": study_id},
                ).all()
            )
            return directions, genes

        return self._read((), read, ([], {}))

    # ----------------------------------------------------------------- trials

    @_database_call
    def start_trial(self, study: str, number: int, genome: dict, *, worker: str | None = None) -> None:
        """Record a trial as running. Starting a number again resets its row."""
        row = _blank_trial(study, number) | {
            "status": RUNNING,
            "genome": _jsonable(genome, where=f"trial {number} genome"),
            "worker": worker,
            "started_at": _utcnow(),
        }
        self._write(lambda conn: _upsert(conn, trials_table, [row]))

    @_database_call
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
        scores: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """Record a trial as complete. Works even if `start_trial` was never called.

        `scores` (optional): its search-split scores, written in the same transaction (what
        `record_scores(study, number, "search", scores)` writes, one commit fewer).
        """
        score_rows = self._score_rows(study, number, "search", scores) if scores else []
        row = _scored_row(study, number, COMPLETE, values, plan_yaml, merge_seconds, eval_seconds, device, weights_hash)

        def write(conn: Connection) -> None:
            if score_rows:
                _upsert(conn, scores_table, score_rows)
            _upsert(conn, trials_table, [row], keep=_KEPT_WHEN_FINISHED)

        self._write(write)

    @_database_call
    def fail_trial(
        self,
        study: str,
        number: int,
        failure: str,
        *,
        plan_yaml: str = "",
        merge_seconds: float | None = None,
        eval_seconds: float | None = None,
        device: str | None = None,
    ) -> None:
        """Record a trial as failed with a one-line reason (newlines are folded, long text cut)."""
        row = _blank_trial(study, number) | {
            "status": FAILED,
            "plan_yaml": plan_yaml,
            "merge_seconds": _optional_float(merge_seconds),
            "eval_seconds": _optional_float(eval_seconds),
            "device": device,
            "failure": _one_line(failure),
            "finished_at": _utcnow(),
        }
        self._write(lambda conn: _upsert(conn, trials_table, [row], keep=_KEPT_WHEN_FINISHED))

    @_database_call
    def prune_trial(
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
    ) -> None:
        """Record a trial stopped at a low rung: complete at that rung (its values there), not a failure."""
        row = _scored_row(study, number, PRUNED, values, plan_yaml, merge_seconds, eval_seconds, device, weights_hash)
        self._write(lambda conn: _upsert(conn, trials_table, [row], keep=_KEPT_WHEN_FINISHED))

    @_database_call
    def record_rung(self, study: str, number: int, rung: int, *, items: int, values: list[float]) -> None:
        """A trial's objective values once it finished `rung` (`items`: scored so far, every task)."""
        row = {
            "study": study,
            "number": int(number),
            "rung": int(rung),
            "items_scored": int(items),
            "objective_values": _encode_values([_float(v) for v in values]),
            "recorded_at": _utcnow(),
        }
        self._write(lambda conn: _upsert(conn, rungs_table, [row]))

    @_database_call
    def record_capped(self, study: str, number: int, *, items: int, of: int) -> None:
        """A trial stopped by capping after scoring `items` of the full budget's `of` (all tasks)."""
        row = {
            "study": study,
            "number": int(number),
            "items_scored": int(items),
            "items_full": int(of),
            "recorded_at": _utcnow(),
        }
        self._write(lambda conn: _upsert(conn, capped_table, [row]))

    @_database_call
    def capped(self, study: str) -> dict[int, tuple[int, int]]:
        """number -> (items scored when capping stopped it, the full budget's items), numbers ascending."""
        t = capped_table
        stmt = select(t.c.number, t.c.items_scored, t.c.items_full).where(t.c.study == study).order_by(t.c.number)
        rows = self._read((t,), lambda conn: conn.execute(stmt).all(), [])
        return {int(number): (int(items), int(full)) for number, items, full in rows}

    @_database_call
    def rungs(self, study: str) -> dict[int, dict[int, tuple[int, list[float]]]]:
        """number -> rung -> (items scored up to it, objective values), numbers and rungs ascending."""
        t = rungs_table
        stmt = (
            select(t.c.number, t.c.rung, t.c.items_scored, t.c.objective_values)
            .where(t.c.study == study)
            .order_by(t.c.number, t.c.rung)
        )
        rows = self._read((t,), lambda conn: conn.execute(stmt).all(), [])
        nested: dict[int, dict[int, tuple[int, list[float]]]] = {}
        for number, rung, items, values in rows:
            nested.setdefault(int(number), {})[int(rung)] = (int(items), _decode_values(values) or [])
        return nested

    @_database_call
    def save_item_order(self, study: str, order: Mapping[str, Sequence[int]]) -> None:
        """The study's item order per task (written once, when the first fidelity run starts)."""
        now = _utcnow()
        rows = [
            {"study": study, "task": str(task), "doc_ids": [int(i) for i in ids], "recorded_at": now}
            for task, ids in order.items()
        ]
        if rows:
            self._write(lambda conn: _upsert(conn, item_orders_table, rows))

    @_database_call
    def item_order(self, study: str) -> dict[str, list[int]]:
        """task -> doc ids in the study's order; empty when none was stored."""
        t = item_orders_table
        stmt = select(t.c.task, t.c.doc_ids).where(t.c.study == study).order_by(t.c.task)
        rows = self._read((t,), lambda conn: conn.execute(stmt).all(), [])
        return {task: [int(i) for i in ids] for task, ids in rows}

    @_database_call
    def fail_running(self, study: str, reason: str, *, worker: str | None = None) -> list[int]:
        """Mark every running trial of `study` failed (of one `worker` only, if given).

        A restarted driver calls this: the trials it had in flight will never report back.
        Returns the numbers of the trials it marked, ascending.
        """
        t = trials_table
        where = [t.c.study == study, t.c.status == RUNNING]
        if worker is not None:
            where.append(t.c.worker == worker)
        stmt = (
            update(t)
            .where(*where)
            .values(status=FAILED, failure=_one_line(reason), finished_at=_utcnow(), objective_values=None)
        )

        def mark(conn: Connection) -> list[int]:
            if conn.dialect.update_returning:
                return list(conn.execute(stmt.returning(t.c.number)).scalars())
            numbers = list(conn.execute(select(t.c.number).where(*where)).scalars())
            conn.execute(stmt)  # same transaction, write lock held: the same rows
            return numbers

        return sorted(self._write(mark))

    @_database_call
    def trials(self, study: str, *, status: str | None = None) -> list[TrialRecord]:
        t = trials_table
        stmt = select(t).where(t.c.study == study).order_by(t.c.number)
        if status is not None:
            stmt = stmt.where(t.c.status == _status(status))
        rows = self._read((trials_table,), lambda conn: conn.execute(stmt).mappings().all(), [])
        return [_trial_record(row) for row in rows]

    @_database_call
    def trial(self, study: str, number: int) -> TrialRecord | None:
        t = trials_table
        stmt = select(t).where(t.c.study == study, t.c.number == number)
        row = self._read((trials_table,), lambda conn: conn.execute(stmt).mappings().first(), None)
        return None if row is None else _trial_record(row)

    # ----------------------------------------------------------------- scores

    @_database_call
    def record_scores(self, study: str, number: int, split: str, scores: Mapping[str, Mapping[str, float]]) -> None:
        """One row per (task, metric); scoring the same trial and split again replaces them."""
        rows = self._score_rows(study, number, split, scores)
        if rows:
            self._write(lambda conn: _upsert(conn, scores_table, rows))

    @staticmethod
    def _score_rows(
        study: str, number: int, split: str, scores: Mapping[str, Mapping[str, float]]
    ) -> list[dict[str, Any]]:
        base = {"study": study, "number": number, "split": _split(split), "recorded_at": _utcnow()}
        return [base | {"task": task, "metric": metric, "value": value} for task, metric, value in _score_rows(scores)]

    @_database_call
    def scores(self, study: str, split: str) -> dict[int, dict[str, dict[str, float]]]:
        """number -> task -> metric -> value, numbers ascending; NaN where a score was NaN."""
        return self._nested_scores(scores_table, "number", study, split)

    def _nested_scores(self, table: Table, key: str, study: str, split: str) -> dict:
        """key -> task -> metric -> value for one study and split of a scores table."""
        t = table
        stmt = (
            select(t.c[key], t.c.task, t.c.metric, t.c.value)
            .where(t.c.study == study, t.c.split == _split(split))
            .order_by(t.c[key], t.c.task, t.c.metric)
        )
        return _nest(self._read((table,), lambda conn: conn.execute(stmt).all(), []))

    @_database_call
    def record_reference(
        self,
        study: str,
        name: str,
        path: str,
        split: str,
        scores: Mapping[str, Mapping[str, float]],
    ) -> None:
        """Scores of a parent or base model, kept as a reference point beside the trials."""
        now = _utcnow()
        model = {"study": study, "name": name, "path": str(path), "recorded_at": now}
        base = {"study": study, "name": name, "split": _split(split), "recorded_at": now}
        rows = [base | {"task": task, "metric": metric, "value": value} for task, metric, value in _score_rows(scores)]

        def write(conn: Connection) -> None:
            _upsert(conn, references_table, [model])
            if rows:
                _upsert(conn, reference_scores_table, rows)

        self._write(write)

    @_database_call
    def references(self, study: str, split: str) -> dict[str, dict[str, dict[str, float]]]:
        """name -> task -> metric -> value, names ascending."""
        return self._nested_scores(reference_scores_table, "name", study, split)

    @_database_call
    def reference_paths(self, study: str) -> dict[str, str]:
        t = references_table
        stmt = select(t.c.name, t.c.path).where(t.c.study == study).order_by(t.c.name)
        return self._read((t,), lambda conn: {name: path for name, path in conn.execute(stmt)}, {})

    # --------------------------------------------------------------- plumbing

    def write(self, work: Callable[[Connection], _T]) -> _T:
        """Run `work` in one committed write transaction (for the lease and `evomerge studies`)."""
        with database_errors(self._url):
            return self._write(work)

    def _write(self, work: Callable[[Connection], _T]) -> _T:
        """Run `work` in one committed transaction, retrying on lock timeouts and deadlocks."""
        self._prepare_for_writes()
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                with self._writer.begin() as conn:
                    return work(conn)
            except OperationalError as error:
                if attempt == _WRITE_ATTEMPTS or not _is_contention(error):
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _read(self, tables: Sequence[Table], read: Callable[[Connection], _T], empty: _T) -> _T:
        """`read` on a connection, or `empty` when the database or one of `tables` does not exist yet."""
        if not self._readable(tables):
            return empty
        with self._engine.connect() as conn:
            return read(conn)

    def _readable(self, tables: Sequence[Table]) -> bool:
        path = sqlite_path(self._url)
        if path is not None and not path.exists():
            return False  # connecting would create the file
        wanted = {t.name for t in tables}
        if wanted <= self._present:
            return True
        with self._engine.connect() as conn:
            self._present |= {name for name in inspect(conn).get_table_names() if name.startswith("evomerge_")}
        return wanted <= self._present

    def _study_columns(self, conn: Connection) -> list[Any]:
        """studies_table's columns, without study_uid in a database written before it existed."""
        if self._uid_column is None:
            self._uid_column = "study_uid" in {c["name"] for c in inspect(conn).get_columns(studies_table.name)}
        return [c for c in studies_table.c if self._uid_column or c.name != "study_uid"]

    def _prepare_for_writes(self) -> None:
        """Create missing tables and add missing columns, once per store (idempotent, race-safe)."""
        if self._ready_for_writes:
            return
        if sqlite_path(self._url) is not None:
            raw = self._engine.raw_connection()
            try:
                use_wal(raw.driver_connection)
            finally:
                raw.close()
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                with self._writer.begin() as conn:
                    metadata.create_all(conn)  # checkfirst: only what is missing
                    columns = {c["name"] for c in inspect(conn).get_columns(studies_table.name)}
                    if "study_uid" not in columns:  # a database from before study uids
                        conn.execute(text(f"ALTER TABLE {studies_table.name} ADD COLUMN study_uid VARCHAR(64)"))
                break
            except DBAPIError:
                # Another process created the same tables (or column) between our look and our
                # CREATE (PostgreSQL reports that as a duplicate pg_type row); look again.
                if attempt == _WRITE_ATTEMPTS:
                    raise
                time.sleep(0.05 * 2**attempt)
        self._present |= {t.name for t in metadata.sorted_tables}
        self._uid_column = True
        self._ready_for_writes = True


def _is_contention(error: OperationalError) -> bool:
    text = str(error.orig).lower()
    return any(word in text for word in ("locked", "busy", "deadlock", "serializ"))


def _upsert(conn: Connection, table: Table, rows: list[dict[str, Any]], keep: Iterable[str] = ()) -> None:
    """Insert `rows`; where the primary key exists, overwrite every column except `keep`."""
    key = [c.name for c in table.primary_key.columns]
    rows = sorted(rows, key=lambda r: tuple(r[k] for k in key))  # one lock order: no deadlocks
    replace = [c for c in rows[0] if c not in key and c not in set(keep)]
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        stmt = insert(table)
        stmt = stmt.on_conflict_do_update(index_elements=key, set_={c: stmt.excluded[c] for c in replace})
        conn.execute(stmt, rows)
        return
    # Any other database: update, and insert what was not there (same transaction).
    for row in rows:
        match = [table.c[k] == row[k] for k in key]
        changed = conn.execute(update(table).where(*match).values({c: row[c] for c in replace}))
        if changed.rowcount == 0:
            conn.execute(table.insert().values(row))


# ---------------------------------------------------------------- conversion


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite keeps no zone; we only ever write UTC
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _float(value: Any) -> float:
    """Any real number (numpy scalars included) as a float; None counts as NaN."""
    return math.nan if value is None else float(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _encode_values(values: Sequence[float]) -> list[float | str | None]:
    # JSON (PostgreSQL's especially) has no NaN or infinity; perplexity can be infinite.
    encoded: list[float | str | None] = []
    for v in values:
        if math.isnan(v):
            encoded.append(None)
        elif math.isinf(v):
            encoded.append("inf" if v > 0 else "-inf")
        else:
            encoded.append(v)
    return encoded


def _decode_values(encoded: Sequence[Any] | None) -> list[float] | None:
    if encoded is None:
        return None
    return [math.nan if v is None else float(v) for v in encoded]


def _score_rows(scores: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, float | None]]:
    rows = []
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            try:
                number = _float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"score {task}/{metric} = {value!r} is not a number; pass floats (NaN is fine)"
                ) from None
            rows.append((str(task), str(metric), None if math.isnan(number) else number))
    return rows


def _nest(rows: Iterable[tuple[Any, str, str, float | None]]) -> dict:
    nested: dict = {}
    for outer, task, metric, value in rows:
        nested.setdefault(outer, {}).setdefault(task, {})[metric] = math.nan if value is None else float(value)
    return nested


def _jsonable(value: Any, *, where: str) -> Any:
    """`value` with numpy scalars/arrays and tuples turned into plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where=where) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return _jsonable(value.tolist(), where=where)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} cannot be stored as JSON; give a finite number")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable; give str/int/float")


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _FAILURE_CHARS else line[: _FAILURE_CHARS - 1] + "…"


def _direction(direction: Any) -> str:
    # Also accepts optuna's StudyDirection (its name is MAXIMIZE / MINIMIZE).
    name = str(getattr(direction, "name", direction)).lower()
    if name not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: use 'maximize' or 'minimize'")
    return name


def _status(status: str) -> TrialStatus:
    if status not in STATUSES:
        raise ValueError(f"status {status!r}: use one of {', '.join(STATUSES)}")
    return TrialStatus(status)


def _split(split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    return Split(split)


# The columns a finished trial's row keeps from its start (start_trial wrote them).
_KEPT_WHEN_FINISHED = ("genome", "worker", "started_at")


def _scored_row(
    study: str,
    number: int,
    status: str,
    values: list[float],
    plan_yaml: str,
    merge_seconds: float,
    eval_seconds: float,
    device: str,
    weights_hash: str,
) -> dict[str, Any]:
    """The trials-table row of a scored trial (complete, or stopped at a rung with that rung's values)."""
    return _blank_trial(study, number) | {
        "status": status,
        "plan_yaml": plan_yaml,
        "objective_values": _encode_values([_float(v) for v in values]),
        "merge_seconds": _float(merge_seconds),
        "eval_seconds": _float(eval_seconds),
        "device": device,
        "weights_hash": weights_hash,
        "finished_at": _utcnow(),
    }


def _blank_trial(study: str, number: int) -> dict[str, Any]:
    """Every trial column, cleared: a written row never keeps stale values from an earlier run."""
    return {
        "study": study,
        "number": int(number),
        "status": RUNNING,
        "genome": {},
        "plan_yaml": "",
        "objective_values": None,
        "merge_seconds": None,
        "eval_seconds": None,
        "device": None,
        "weights_hash": None,
        "failure": None,
        "worker": None,
        "started_at": None,
        "finished_at": None,
    }


def _trial_record(row: Mapping[str, Any]) -> TrialRecord:
    status = TrialStatus(row["status"])
    return TrialRecord(
        study=row["study"],
        number=int(row["number"]),
        status=status,
        genome=dict(row["genome"] or {}),
        plan_yaml=row["plan_yaml"] or "",
        values=_decode_values(row["objective_values"]) if status in (COMPLETE, PRUNED) else None,
        merge_seconds=row["merge_seconds"],
        eval_seconds=row["eval_seconds"],
        device=row["device"],
        weights_hash=row["weights_hash"],
        failure=row["failure"],
        worker=row["worker"],
        started_at=_as_utc(row["started_at"]),
        finished_at=_as_utc(row["finished_at"]),
    )


def _state_name(state: Any) -> str:
    """optuna keeps a trial's state as its enum name (or number, in some old schemas)."""
    names = ("RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING")
    if isinstance(state, int) or (isinstance(state, str) and state.isdigit()):
        return names[int(state)] if int(state) < len(names) else str(state)
    return str(getattr(state, "name", state)).upper()


def _json_string(value_json: str | None) -> str | None:
    if value_json is None:
        return None
    try:
        value = json.loads(value_json)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
