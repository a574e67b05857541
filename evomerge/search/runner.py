"""The search loop: ask optuna for a genome, merge it in place, score it, store it, tell optuna.

Guarantees: a trial that fails (NaN weights, lm-eval error, out of memory, anything) is recorded
with its reason and the study goes on; a completed trial is in the store before optuna is told,
so killing the process at any moment loses nothing that finished; running the same command again
resumes the study (trials left running by a dead driver are failed with a reason and retried
once). Search and selection are kept apart: the front's members are re-scored on held-out
selection tasks before anything is called best.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.config.space import SearchSpace
from evomerge.errors import ConfigError, EvomergeError
from evomerge.progress import SearchProgress
from evomerge.search.pareto import pareto_front, weighted_score
from evomerge.store import display_url
from evomerge.store.lease import StudyLease
from evomerge.store.protocol import TrialReader, TrialRecorder
from evomerge.store.trial_store import TrialStore

log = logging.getLogger("evomerge.search")

Scores = Mapping[str, Mapping[str, float]]


def metric_value(scores: Scores, task: str, metric: str) -> float:
    if task not in scores:
        raise KeyError(f"lm-eval returned no results for task '{task}' (got: {', '.join(scores) or 'nothing'})")
    metrics = scores[task]
    if metric not in metrics:
        numeric = [m for m in metrics if "stderr" not in m]
        raise KeyError(f"task '{task}' has no metric '{metric}' (it reports: {', '.join(numeric)})")
    return float(metrics[metric])


def objective_values(space: SearchSpace, scores: Scores, *, split: str = "search") -> list[float]:
    """Per-objective raw values (search tasks, or selection tasks when split='selection')."""
    values = []
    for objective in space.objectives:
        task = objective.task if split == "search" else objective.selection_task
        values.append(metric_value(scores, task, objective.metric) if task else math.nan)
    return values


def scalarize(space: SearchSpace, values: Sequence[float]) -> float:
    """Weighted sum of objective values, minimize objectives negated (larger is better)."""
    return weighted_score(values, [o.direction for o in space.objectives], [o.weight for o in space.objectives])


def told_values(space: SearchSpace, values: Sequence[float]) -> list[float]:
    """What optuna is told: every objective (multi-objective) or their weighted sum."""
    return list(values) if space.multi_objective else [scalarize(space, values)]


@dataclass
class FrontRow:
    label: str  # "trial 12" or a reference model's name
    number: int | None  # trial number (None for references)
    search: list[float]
    selection: list[float] | None
    weights_hash: str | None = None

    def mean(self, which: str = "search") -> float:
        values = self.search if which == "search" else self.selection
        if not values:
            return math.nan
        return sum(values) / len(values)


@dataclass
class SearchSummary:
    study_name: str
    storage_url: str
    objective_names: list[str]
    n_complete: int
    n_failed: int
    front: list[FrontRow]
    references: list[FrontRow]
    best: FrontRow | None
    seconds: float
    space_path: str | None = None
    notes: list[str] = field(default_factory=list)


def _optuna_storage(url: str):
    from evomerge.search.storage import make_storage
    from evomerge.store.database import StorageError, check_storage, database_errors
    from evomerge.store.trial_store import tune_sqlite

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
    return storage


def open_study(space: SearchSpace, *, sampler=None):
    """Create or load the study (same database as the trial store)."""
    import optuna

    from evomerge.search.samplers import make_sampler
    from evomerge.store.database import database_errors

    storage = _optuna_storage(space.storage_url)
    with database_errors(space.storage_url):
        study = optuna.create_study(
            study_name=space.study_name,
            storage=storage,
            directions=space.directions,
            sampler=sampler or make_sampler(space),
            load_if_exists=True,
        )
    if list(study.directions) and [d.name.lower() for d in study.directions] != space.directions:
        raise ConfigError(
            f"study '{space.study_name}' in {display_url(space.storage_url)} was created with directions "
            f"{[d.name.lower() for d in study.directions]}, this space needs {space.directions}: "
            "set search.study_name to start a new study",
            file=space.source_path, field="objectives",
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
            _queue_again(study, trial, params)
            notes.append(f"trial {trial.number}: interrupted, failed and queued again")
        else:
            notes.append(f"trial {trial.number}: interrupted before its genome was drawn, failed")
    return notes


def _queue_again(study, trial, params: Mapping[str, Any]) -> None:
    """Enqueue a failed trial's genome once more, keeping which reference point it is."""
    attrs = {"retry_of": trial.number}
    if "seed" in trial.user_attrs:  # which reference point this genome is
        attrs["seed"] = trial.user_attrs["seed"]
    study.enqueue_trial(dict(params), user_attrs=attrs, skip_if_exists=False)


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


def enqueue_seeds(study, space: SearchSpace, genome) -> int:
    """Fresh studies start from each parent alone and the uniform mix (the front's reference points)."""
    if study.get_trials(deepcopy=False):
        return 0
    seeds = []
    if "parents" in space.search.enqueue:
        for model in genome.finetunes:
            params = genome.parent_params(model)
            if params is not None:
                seeds.append((params, {"seed": f"parent:{model}"}))
    if "uniform" in space.search.enqueue:
        params = genome.uniform_params()
        if params is not None:
            seeds.append((params, {"seed": "uniform"}))
    for params, attrs in seeds:
        study.enqueue_trial(params, user_attrs=attrs)
    return len(seeds)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:500]


def _note_study(space, store, study, genome, *, finished, front=None, best=None, selection_errors=None) -> None:
    """What the dashboard shows of the study: its attributes and note (parents, front, best), and at
    the end each finalist's note (held-out scores, the best marked)."""
    from evomerge.search import annotate

    try:
        front = compute_front(space, store) if front is None else front
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        records = store.trials(space.study_name)
        seeds = {n: annotate.role(t.user_attrs) for n, t in trials.items() if t.user_attrs.get("seed")}
        references = reference_rows(space, store)
        names = [o.label for o in space.objectives]
        methods = annotate.methods_line(genome, trials[best.number].params) if best is not None and best.number in trials else None
        annotate.set_study_attrs(study, annotate.study_attrs(names, references, best, seeds, finished=finished, methods=methods))
        annotate.write_note(study, None, annotate.study_note(
            space.study_name, space.objectives, front, references, best=best, seeds=seeds,
            n_complete=sum(r.status == "complete" for r in records), n_failed=sum(r.status == "failed" for r in records),
            finalists=space.search.finalists, finished=finished,
        ))
        if not finished:
            return
        errors = selection_errors or {}
        noted = {r.number: r for r in front if r.selection or r.number in errors}
        if best is not None:
            noted[best.number] = best
        for number, row in noted.items():
            if number in trials:
                annotate.write_note(study, trials[number]._trial_id, annotate.finalist_note(
                    names, row.selection, is_best=row is best, error=errors.get(number)))
    except Exception as error:  # the notes are a view: never fail a search over them
        log.warning("could not write the dashboard notes: %s", _short(error))


def _finished_count(study) -> int:
    """Trials that count against n_trials: finished ones, except failures whose genome was queued
    again (a worker died or the driver was interrupted): their retry takes their place."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if t.user_attrs.get("retry_of") is not None}
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL) and t.number not in retried)


def compute_front(space: SearchSpace, store: TrialReader) -> list[FrontRow]:
    """The Pareto front of completed trials over the per-objective search values (one row per distinct model)."""
    search_scores = store.scores(space.study_name, "search")
    selection_scores = store.scores(space.study_name, "selection")
    rows: list[FrontRow] = []
    seen_hashes: set[str] = set()
    for record in store.trials(space.study_name, status="complete"):
        scores = search_scores.get(record.number)
        if not scores:
            continue
        if record.weights_hash and record.weights_hash in seen_hashes:
            continue  # the same merged model twice (a retried or re-enqueued genome)
        try:
            values = objective_values(space, scores)
        except KeyError:
            continue
        if any(math.isnan(v) for v in values):
            continue
        if record.weights_hash:
            seen_hashes.add(record.weights_hash)
        selection = None
        if record.number in selection_scores:
            try:
                selection = objective_values(space, selection_scores[record.number], split="selection")
            except KeyError:
                selection = None
        rows.append(FrontRow(f"trial {record.number}", record.number, values, selection, record.weights_hash))
    directions = [o.direction for o in space.objectives]
    keep = pareto_front([r.search for r in rows], directions)
    front = [rows[i] for i in keep]
    front.sort(key=lambda r: scalarize(space, r.search), reverse=True)
    return front


def reference_rows(space: SearchSpace, store: TrialReader) -> list[FrontRow]:
    search = store.references(space.study_name, "search")
    selection = store.references(space.study_name, "selection")
    rows = []
    for name, scores in search.items():
        try:
            values = objective_values(space, scores)
        except KeyError:
            continue
        chosen = None
        if name in selection:
            try:
                chosen = objective_values(space, selection[name], split="selection")
            except KeyError:
                chosen = None
        rows.append(FrontRow(name, None, values, chosen))
    return rows


def pick_best(space: SearchSpace, front: Sequence[FrontRow]) -> FrontRow | None:
    """Best by the weighted selection score when finalists were re-scored, else by the search score."""
    if not front:
        return None
    scored = [r for r in front if r.selection and not any(math.isnan(v) for v in r.selection)]
    if scored:
        return max(scored, key=lambda r: scalarize(space, r.selection))
    return max(front, key=lambda r: scalarize(space, r.search))


def _evaluate_all(pool, jobs: Sequence[tuple[Any, Mapping[str, Any]]], split: str, on_done: Callable[[], Any] | None = None) -> dict[Any, Any]:
    """Evaluate several genomes on `split`, up to pool.size at once; key -> outcome (on_done() after each)."""
    pending = list(jobs)
    running: dict[int, Any] = {}
    outcomes = {}
    while pending or running:
        while pending and len(running) < pool.size and pool.can_submit():
            key, params = pending.pop(0)
            running[pool.submit(params, split)] = key
        outcome = pool.wait_any()
        if outcome is not None:
            outcomes[running.pop(outcome.ticket)] = outcome
            if on_done is not None:
                on_done()
    return outcomes


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
) -> SearchSummary:
    """Run (or resume) the study described by `space` until n_trials trials have finished.

    `workers` (default: search.workers) candidates are evaluated at once: in this process for
    one local worker, by Ray actors otherwise. Pass `pool` or `worker` to reuse loaded ones.
    """
    import optuna

    from evomerge.preflight import preflight_space
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
    try:
        study = open_study(space)
        with StudyLease(store, space.study_name) as lease:
            notes = prepare_study(study, store, space, genome)
            if pool is None:
                bar.start_phase("loading", detail=f"{len(genome.models)} models")
                pool = make_pool(space, workers=workers, verbose=verbose, genome=genome)  # checks tasks, loads sources
                bar.advance()
            try:
                return _search_loop(space, pool, genome, total, limit, bar, on_trial, started,
                                    study=study, store=store, lease=lease, notes=notes)
            finally:
                if own_pool:
                    pool.close()
    finally:
        bar.close()
        store.close()


class _ReferenceScoringError(EvomergeError):
    """A reference model (the base, a parent) could not be scored: a setup problem, not a trial's."""


def _score_reference(pool, name: str, split: str) -> Scores:
    try:
        return pool.score_reference(name, split)
    except EvomergeError:
        raise
    except Exception as error:
        raise _ReferenceScoringError(
            f"scoring the reference model '{name}' on the {split} tasks failed ({_short(error)}); "
            "check the objectives' tasks and the eval settings"
        ) from error


def _abandon(study, store: TrialRecorder, space: SearchSpace, held, error: BaseException, lease) -> None:
    """Fail the trials this driver holds (store and optuna alike) and queue their genomes again.

    Best effort: with the database gone, the next run's recovery does the same.
    """
    from optuna.trial import TrialState

    if lease.lost or not held:
        return  # a driver that lost its lease leaves the trials to the one that took over
    cause = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else _short(error)
    reason = f"search stopped before this trial finished: {cause}"
    for trial, params in held:
        try:
            genome = dict(params or trial.params or _fixed_params(study, trial))
            if store.trial(space.study_name, trial.number) is None:
                store.start_trial(space.study_name, trial.number, genome)
            store.fail_trial(space.study_name, trial.number, reason)
            trial.set_user_attr("failure", reason)
            _tell(study, trial, state=TrialState.FAIL)
            if genome and trial.user_attrs.get("retry_of") is None:
                _queue_again(study, trial, genome)
        except Exception as problem:  # noqa: BLE001 - the original error is the one to report
            log.warning("trial %d: could not be failed after the search stopped: %s", trial.number, _short(problem))


def _fixed_params(study, trial) -> dict[str, Any]:
    """An enqueued trial's genome as optuna holds it before its genes are suggested."""
    try:
        return dict(study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params") or {})
    except Exception:  # noqa: BLE001 - nothing to retry then
        return {}


def _tell(study, trial, values=None, *, state=None) -> None:
    """study.tell without reading the finished trial back (tell returns it; we never use it)."""
    try:
        from optuna.study._tell import _tell_with_warning
    except ImportError:  # another optuna layout: the public call does the same, plus the read
        study.tell(trial, values, state=state)
        return
    _tell_with_warning(study=study, trial=trial, value_or_values=values, state=state)


def _search_loop(space, pool, genome, total, limit, bar, on_trial, started, *, study, store, lease, notes) -> SearchSummary:
    from optuna.trial import TrialState

    from evomerge.search import annotate
    from evomerge.search.storage import batched_params

    objective_names = [o.label for o in space.objectives]
    reference_models = [*([genome.base] if genome.base else []), *genome.finetunes]

    # Reference points: the base and every parent as they are. Scored before the seeds are
    # queued, so a model that cannot be scored leaves no trial waiting in a fresh study.
    known = store.references(space.study_name, "search")
    unscored = [name for name in reference_models if name not in known]
    if unscored:
        bar.start_phase("parents", len(unscored))
    for name in unscored:
        store.record_reference(space.study_name, name, str(genome.paths[name]), "search", _score_reference(pool, name, "search"))
        bar.advance()
    enqueue_seeds(study, space, genome)
    _note_study(space, store, study, genome, finished=False)  # the parents' scores, on the dashboard from the start

    bar.start_phase("search", total, done=_finished_count(study))
    directions = [o.direction for o in space.objectives]
    # Values of completed trials, kept in memory for the progress bar (no database read per trial).
    seen = compute_front(space, store)
    search_values = [row.search for row in seen]
    leader = max(seen, key=lambda row: scalarize(space, row.search), default=None)
    best_so_far = scalarize(space, leader.search) if leader else -math.inf
    bar.update(front=len(seen), failed=len(store.trials(space.study_name, status="failed")),
               best=(leader.number, leader.mean()) if leader else None)
    in_flight: dict[int, tuple[Any, dict[str, Any], float]] = {}
    asking = None  # a trial asked for and not yet handed to a worker
    reporting = None  # a trial whose outcome is being stored and told
    stopping = False
    try:
        while True:
            while not stopping and len(in_flight) < pool.size and pool.can_submit():
                if total is not None and _finished_count(study) + len(in_flight) >= total:
                    break
                if limit is not None and time.monotonic() - started > limit:
                    notes.append(f"stopped starting trials after the {limit:.0f}s timeout")
                    stopping = True
                    break
                lease.check()  # never ask for a trial of a study another driver has taken over
                asked = time.perf_counter()
                trial = asking = study.ask()
                with batched_params(study):  # one transaction for all genes, committed before the merge
                    params = genome.suggest(trial)
                store.start_trial(space.study_name, trial.number, params, worker=getattr(pool, "name", None))
                in_flight[pool.submit(params, "search")] = (trial, params, asked)
                asking = None
                bar.update(in_flight=len(in_flight))
            if not in_flight and not pool.recovering():
                break
            outcome = pool.wait_any()
            if outcome is None:  # a restarted worker is back; go and give it work
                continue
            trial, params, asked = in_flight.pop(outcome.ticket)
            reporting = (trial, params)
            bar.update(in_flight=len(in_flight))
            result, error = outcome.result, outcome.error
            values: list[float] = []
            if error is None:
                try:
                    values = objective_values(space, result.scores)
                    if any(math.isnan(v) for v in values):
                        raise FloatingPointError(f"an objective is NaN: {values}")
                except Exception as problem:
                    error = problem
            lease.check()  # the trial is another driver's now: tell optuna nothing
            if error is not None:  # any failure fails the trial, never the study
                reason = _short(error)
                log.warning("trial %d failed: %s", trial.number, reason)
                store.fail_trial(space.study_name, trial.number, reason)
                trial.set_user_attr("failure", reason)
                trial.set_user_attr("methods", annotate.methods_line(genome, params))
                _tell(study, trial, state=TrialState.FAIL)
                if outcome.worker_died and trial.user_attrs.get("retry_of") is None:
                    study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
                reporting = None
                bar.update(failed=len(store.trials(space.study_name, status="failed")))
                bar.advance()
                continue
            told = told_values(space, values)
            store.finish_trial(
                space.study_name,
                trial.number,
                scores=result.scores,
                values=told,
                plan_yaml=result.plan_yaml,
                merge_seconds=result.merge_seconds,
                eval_seconds=result.eval_seconds,
                device=result.device,
                weights_hash=result.weights_hash,
            )
            annotate.set_trial_attrs(trial, annotate.search_attrs(  # what the dashboard shows of the trial
                objective_names, values, methods=annotate.methods_line(genome, params),
                weights_hash=result.weights_hash, role_text=annotate.role(trial.user_attrs),
                seconds={"merge": result.merge_seconds, "hash": result.extra.get("hash_seconds"),
                         "eval": result.eval_seconds, "trial": time.perf_counter() - asked},
            ))
            _tell(study, trial, told)  # every other detail is in the trial store
            reporting = None
            if on_trial is not None:
                on_trial({
                    "number": trial.number, "wall_seconds": time.perf_counter() - asked, "values": values,
                    "merge_seconds": result.merge_seconds, "eval_seconds": result.eval_seconds,
                    "hash_seconds": result.extra.get("hash_seconds", 0.0), "worker": result.worker,
                })
            if scalarize(space, values) > best_so_far:
                best_so_far = scalarize(space, values)
                bar.update(best=(trial.number, annotate.mean(values)))
            search_values.append(values)
            bar.update(front=len(pareto_front(search_values, directions)))
            bar.advance()
    except BaseException as error:
        # Outside a trial's own failure policy (the store, optuna, the pool, Ctrl-C): no trial of
        # this driver stays RUNNING; each is failed with the reason and its genome queued again.
        held = [(trial, params) for trial, params, _ in in_flight.values()]
        if asking is not None:
            held.append((asking, None))
        if reporting is not None:
            held.append(reporting)
        _abandon(study, store, space, held, error, lease)
        raise
    finally:
        bar.close()

    # Selection: re-score the best front members on held-out tasks before calling anything best.
    front = compute_front(space, store)
    selection_errors: dict[int, str] = {}
    if pool.has_selection:
        try:
            known = store.references(space.study_name, "selection")
            unscored = [name for name in reference_models if name not in known]
            jobs = [(row.number, store.trial(space.study_name, row.number).genome) for row in front[: space.search.finalists] if row.selection is None]
            if unscored or jobs:
                bar.start_phase("selection", len(unscored) + len(jobs))
            for name in unscored:
                store.record_reference(
                    space.study_name, name, str(genome.paths[name]), "selection", _score_reference(pool, name, "selection")
                )
                bar.advance()
            for number, outcome in _evaluate_all(pool, jobs, "selection", on_done=bar.advance).items():
                if outcome.error is None:
                    store.record_scores(space.study_name, number, "selection", outcome.result.scores)
                else:
                    selection_errors[number] = _short(outcome.error)
                    notes.append(f"trial {number}: selection scoring failed ({selection_errors[number]})")
        except Exception as error:  # every trial is told already: keep the search, report the phase
            if isinstance(error, EvomergeError) and not isinstance(error, _ReferenceScoringError):
                raise
            notes.append(f"selection phase stopped ({_short(error)}); the best is picked from what was scored")
        finally:
            bar.close()
        front = compute_front(space, store)
    best = pick_best(space, front)
    if best is not None:
        lease.check()
        study.set_user_attr("evomerge_best_trial", best.number)
    _note_study(space, store, study, genome, finished=True, front=front, best=best, selection_errors=selection_errors)
    trials = store.trials(space.study_name)
    return SearchSummary(
        study_name=space.study_name,
        storage_url=space.storage_url,
        objective_names=objective_names,
        n_complete=sum(t.status == "complete" for t in trials),
        n_failed=sum(t.status == "failed" for t in trials),
        front=front,
        references=reference_rows(space, store),
        best=best,
        seconds=time.monotonic() - started,
        space_path=str(space.source_path) if space.source_path else None,
        notes=notes,
    )
