"""Run a search: open (or resume) the study, take its lease, load the workers, run the loop.

Guarantees: a trial that fails (NaN weights, lm-eval error, out of memory, anything) is recorded
with its reason and the study goes on; a completed trial is in the store before optuna is told,
so killing the process at any moment loses nothing that finished; running the same command again
resumes the study (trials left running by a dead driver are failed with a reason and retried
once). Search and selection are kept apart: the front's members are re-scored on held-out
selection tasks before anything is called best. The loop itself is `evomerge.search.loop`, the
front it reports `evomerge.search.front`; their names are importable from here too.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from evomerge.config.space import SearchSpace
from evomerge.errors import ConfigError
from evomerge.progress import SearchProgress
from evomerge.search.front import (
    FrontRow,
    Scores,
    SearchSummary,
    compute_front,
    metric_value,
    objective_values,
    pick_best,
    reference_rows,
    scalarize,
    told_values,
)
from evomerge.search.loop import SearchLoop, enqueue_seeds, queue_again
from evomerge.store import display_url
from evomerge.store.lease import StudyLease
from evomerge.store.protocol import TrialRecorder
from evomerge.store.trial_store import TrialStore

if TYPE_CHECKING:
    from optuna.samplers import BaseSampler

# What library users import from here: the search, the study's opening, and the front it reports.
__all__ = [
    "FrontRow",
    "Scores",
    "SearchLoop",
    "SearchSummary",
    "compute_front",
    "enqueue_seeds",
    "metric_value",
    "objective_values",
    "open_study",
    "pick_best",
    "prepare_study",
    "recover_interrupted",
    "reference_rows",
    "run_search",
    "scalarize",
    "told_values",
]


def _optuna_storage(url: str):
    from evomerge.search.storage import make_storage
    from evomerge.stop_signals import watch_connections
    from evomerge.store.database import StorageError, check_storage, database_errors, tune_sqlite

    check_storage(url)  # a bad URL, a missing folder, a garbage file: one line, nothing created
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    from sqlalchemy.exc import IntegrityError, OperationalError

    with database_errors(url):
        for attempt in range(1, 6):
            try:
                storage = make_storage(url, engine_kwargs=engine_kwargs)
                break
            except (IntegrityError, OperationalError) as error:
                # Two drivers creating optuna's tables in a new database at once: one of them
                # finds the other's version row or table; by now they are there, look again.
                if attempt == 5 or not isinstance(error, IntegrityError) and "already exists" not in str(error):
                    raise
                time.sleep(0.1 * attempt)
            except RuntimeError as error:  # optuna: "... no longer compatible with the table schema ..."
                raise StorageError(f"storage {display_url(url)}: {' '.join(str(error).split())}") from error
    tune_sqlite(storage.engine)
    watch_connections(storage.engine)  # a stop signal waits until the main thread's connection is back
    return storage


def open_study(space: SearchSpace, *, sampler: BaseSampler | None = None):
    """Create or load the study (same database as the trial store), sampled by `sampler` when given,
    else by the one the space names."""
    import optuna

    from evomerge.search.samplers import make_sampler
    from evomerge.store.database import database_errors

    if sampler is not None and not isinstance(sampler, optuna.samplers.BaseSampler):
        raise TypeError(f"sampler must be an optuna.samplers.BaseSampler, not {type(sampler).__name__}")
    storage = _optuna_storage(space.storage_url)
    if sampler is None:
        spec = space.search
        sampler = make_sampler(spec.sampler, seed=spec.seed, options=spec.sampler_options, source=space.source_path)
    with database_errors(space.storage_url):
        study = optuna.create_study(
            study_name=space.study_name,
            storage=storage,
            directions=space.directions,
            sampler=sampler,
            load_if_exists=True,
        )
    if list(study.directions) and [d.name.lower() for d in study.directions] != space.directions:
        raise ConfigError(
            f"study '{space.study_name}' in {display_url(space.storage_url)} was created with directions "
            f"{[d.name.lower() for d in study.directions]}, this space needs {space.directions}: "
            "set search.study_name to start a new study",
            file=space.source_path,
            field="objectives",
        )
    return study


def recover_interrupted(study, store: TrialRecorder, space: SearchSpace) -> list[str]:
    """Trials a dead driver left RUNNING: keep the finished ones, fail and retry the rest once."""
    from optuna.trial import TrialState

    notes = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = store.trial(space.study_name, trial.number)
        if record is not None and record.status == "complete" and record.values:
            study.tell(trial.number, record.values)
            notes.append(f"trial {trial.number}: finished before the interruption, kept")
            continue
        if record is not None and record.status == "pruned":
            study.tell(trial.number, state=TrialState.PRUNED)
            notes.append(f"trial {trial.number}: stopped at a low rung before the interruption, kept")
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        reason = "interrupted: the search process stopped before this trial finished"
        # An enqueued genome (a parent, the uniform mix) killed before its genes were written has
        # no params yet; optuna still holds it as the trial's fixed params.
        params = dict(trial.params) or dict(trial.system_attrs.get("fixed_params") or {})
        if record is None:
            store.start_trial(space.study_name, trial.number, params)
        store.fail_trial(space.study_name, trial.number, reason)
        if trial.user_attrs.get("retry_of") is not None:
            notes.append(f"trial {trial.number}: interrupted again, failed")
        elif params:
            queue_again(study, trial, params)
            notes.append(f"trial {trial.number}: interrupted, failed and queued again")
        else:
            notes.append(f"trial {trial.number}: interrupted before its genome was drawn, failed")
    return notes


def prepare_study(study, store: TrialStore, space: SearchSpace, genome) -> list[str]:
    """Under the study's lease, before any model is loaded: the store's rows tied to this optuna
    study (rows of a deleted namesake removed), the space checked against what the study holds,
    the study described, and the trials a dead driver left RUNNING recovered."""
    from evomerge.search.study_setup import (
        check_space_fits_study,
        ensure_study_uid,
        forget_stale_rows,
        recorded_distributions,
    )
    from evomerge.store.database import database_errors

    with database_errors(space.storage_url):
        uid = ensure_study_uid(study)
        numbers = [t.number for t in study.get_trials(deepcopy=False)]
    notes = forget_stale_rows(store, space.study_name, uid, numbers)
    with database_errors(space.storage_url):
        recorded = recorded_distributions(study)
    check_space_fits_study(space, store.study_info(space.study_name), recorded, genome.distributions())
    objective_names = [o.label for o in space.objectives]
    store.save_study(
        space.study_name,
        space_yaml=space.source_text,
        space_path=str(space.source_path or ""),
        directions=[o.direction for o in space.objectives],
        objective_names=objective_names,
        objective_weights=[o.weight for o in space.objectives],
        uid=uid,
    )
    with database_errors(space.storage_url):
        with warnings.catch_warnings():  # "experimental" since optuna 3.2; what the dashboard labels axes with
            warnings.simplefilter("ignore")
            study.set_metric_names(objective_names if space.multi_objective else ["weighted score"])
        return notes + recover_interrupted(study, store, space)


def run_search(
    space: SearchSpace,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    verbose: bool = False,
    worker=None,
    pool=None,
    workers: int | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    sampler: BaseSampler | None = None,
) -> SearchSummary:
    """Run (or resume) the study described by `space` until n_trials trials have finished.

    `workers` (default: search.workers) candidates are evaluated at once: in this process for
    one local worker, by Ray actors otherwise. Pass `pool` or `worker` to reuse loaded ones, and
    `sampler` (any optuna sampler) to sample with it instead of the one search.sampler names.
    """
    import optuna

    from evomerge.preflight import preflight_space
    from evomerge.search.storage import close_storage
    from evomerge.workers.pool import InProcessPool, make_pool

    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()
    total = n_trials or space.search.n_trials
    limit = timeout or space.search.timeout
    own_pool = pool is None and worker is None
    if pool is None and worker is not None:
        pool = InProcessPool(worker)
    # What `validate` checks (genome, tasks, storage, source headers), before models go to a device.
    genome = pool.genome if pool is not None else preflight_space(space).genome
    # The database, the study, its lease and the space's fit with it: all before models load.
    store = TrialStore(space.storage_url)
    bar = SearchProgress(total, enabled=progress)
    study = None
    try:
        study = open_study(space, sampler=sampler)
        with StudyLease(store, space.study_name) as lease:
            notes = prepare_study(study, store, space, genome)
            if pool is None:
                bar.start_phase("loading", detail=f"{len(genome.models)} models")
                pool = make_pool(space, workers=workers, verbose=verbose, genome=genome)  # checks tasks, loads sources
                bar.advance()
            try:
                loop = SearchLoop(
                    space,
                    pool,
                    genome,
                    study,
                    store,
                    lease,
                    bar,
                    total=total,
                    limit=limit,
                    started=started,
                    notes=notes,
                    on_trial=on_trial,
                )
                return loop.run()
            finally:
                if own_pool:
                    pool.close()
    finally:
        bar.close()
        store.close()
        if study is not None:
            close_storage(study)
