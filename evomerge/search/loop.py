"""The search loop: ask optuna for a genome, hand it to a worker, take the outcome, store it, tell optuna.

One trial's outcome goes through one failure policy (`SearchLoop.take`): a worker's error, a
missing task or a NaN objective fails that trial with its reason and the study goes on; a
completed trial is in the store before optuna is told. Anything outside that policy (the store,
optuna, the pool, Ctrl-C) fails every trial this driver holds and queues its genome again
(`abandon`), so no trial stays RUNNING. The pool is anything with the worker pool's methods, so
the loop runs with a fake pool in tests, without Ray or lm-eval.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.search import annotate, fidelity, pruners
from evomerge.search.front import (
    FrontRow,
    Scores,
    SearchSummary,
    Split,
    compute_front,
    objective_values,
    pick_best,
    reference_rows,
    scalarize,
    told_values,
)
from evomerge.search.pareto import pareto_front
from evomerge.stop_signals import stop_reason

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace
    from evomerge.evaluate.protocol import Margins
    from evomerge.genome.protocol import Genome
    from evomerge.progress import SearchProgress
    from evomerge.store.lease import StudyLease
    from evomerge.store.protocol import TrialRecorder
    from evomerge.workers.protocol import WorkerPool

log = logging.getLogger("evomerge.search")


def stored_fields(result: Any) -> dict[str, Any]:
    """What the trial store keeps of a worker's result beside the values: recipe, times, device, hash."""
    return {
        "plan_yaml": result.plan_yaml,
        "merge_seconds": result.merge_seconds,
        "eval_seconds": result.eval_seconds,
        "device": result.device,
        "weights_hash": result.weights_hash,
    }


def short_error(error: BaseException) -> str:
    """An error as one line of at most 500 characters: what a trial's failure reason holds."""
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:500]


@dataclass
class RunningTrial:
    """A trial handed to a worker: the optuna trial, its genome, and when it was asked for."""

    trial: Any  # optuna.trial.Trial
    params: dict[str, Any] | None  # None until the genome is suggested
    asked: float  # time.perf_counter() just before study.ask()
    # Successive halving (eval.fidelity): the rung being scored and what the lower rungs gave.
    rung: int = 0
    step: int = 0  # at the top rung with `cap`: the step being scored (RungLadder.step_items)
    item_scores: dict = field(default_factory=dict)  # leaf task -> metric -> doc id -> value, every rung so far
    merge_seconds: float = 0.0  # summed over its rungs
    eval_seconds: float = 0.0


@dataclass
class SearchLoop:
    """One run of the search over an opened, prepared, leased study: references, trials, finalists."""

    space: SearchSpace
    pool: WorkerPool
    genome: Genome
    study: Any  # optuna.Study
    store: TrialRecorder
    lease: StudyLease
    bar: SearchProgress
    total: int | None  # trials that count against n_trials; None: until the timeout
    limit: float | None  # seconds after `started` past which no trial is started
    started: float  # time.monotonic() when run_search began
    notes: list[str] = field(default_factory=list)
    on_trial: Callable[[dict[str, Any]], None] | None = None
    # What the loop holds while it runs.
    in_flight: dict[int, RunningTrial] = field(default_factory=dict, init=False)  # pool ticket -> trial
    asking: RunningTrial | None = field(default=None, init=False)  # asked for, not yet handed to a worker
    reporting: RunningTrial | None = field(default=None, init=False)  # its outcome being stored and told
    stopping: bool = field(default=False, init=False)  # the timeout passed: start no more trials
    search_values: list[list[float]] = field(default_factory=list, init=False)  # completed trials', for the bar
    best_score: float = field(default=-math.inf, init=False)  # best weighted search score so far, for the bar
    selection_errors: dict[int, str] = field(default_factory=dict, init=False)  # finalist -> why its rescoring failed
    estimator: Any = field(default=None, init=False)  # the study's IrtCalibration with eval.estimator, else None
    ladder: fidelity.RungLadder | None = field(default=None, init=False)  # eval.fidelity's rungs; None: full budget
    reached: dict[int, dict[int, list[float]]] = field(default_factory=dict, init=False)  # rung -> trial -> values
    reference_margins: dict[str, Margins] = field(default_factory=dict, init=False)  # order: margin, per reference

    def run(self) -> SearchSummary:
        # Reference points first: a model that cannot be scored leaves no trial waiting in a fresh study.
        unscored = self.unscored_references("search")
        if self.space.eval.estimator is not None:
            from evomerge.search.calibration import CALIBRATION_ATTR

            if CALIBRATION_ATTR not in self.study.user_attrs:
                unscored = []  # the IRT calibration scores them, on every item, and records them
        if unscored:
            self.bar.start_phase("parents", len(unscored))
        self.score_references(unscored, "search")
        self.prepare_fidelity()
        enqueue_seeds(self.study, self.space, self.genome)  # first: it enqueues only into an empty study
        if self.space.eval.estimator is not None:
            self.calibrate()
        self.note_dashboard(finished=False)  # the parents' scores, on the dashboard from the start
        self.search()
        if self.estimator is not None:
            self.rescore_front()
        front = self.select_finalists()
        return self.summarise(front)

    # -- references -------------------------------------------------------------------------

    @property
    def reference_models(self) -> list[str]:
        return [*([self.genome.base] if self.genome.base else []), *self.genome.finetunes]

    def unscored_references(self, split: Split) -> list[str]:
        known = self.store.references(self.space.study_name, split)
        return [name for name in self.reference_models if name not in known]

    def score_references(self, names: Sequence[str], split: Split) -> None:
        # eval.fidelity.order 'margin' reads each reference's answer margins in the same pass,
        # while the study has no item order yet (the best reference per task decides it).
        metrics = self.margin_metrics() if split == Split.SEARCH else None
        for name in names:
            scores, margins = score_reference(self.pool, name, split, metrics)
            if margins is not None:
                self.reference_margins[name] = margins
            self.store.record_reference(self.space.study_name, name, str(self.genome.paths[name]), split, scores)
            self.bar.advance()

    def margin_metrics(self) -> dict[str, str] | None:
        """Each objective's task -> metric when the item order is still to be drawn by margins."""
        spec = self.space.eval.fidelity
        if spec is None or spec.order != "margin" or self.store.item_order(self.space.study_name):
            return None
        return fidelity.task_metrics(self.space)

    def expert_margins(self) -> Margins:
        """Per objective task, the answer margins of the reference model that scores it best (one
        more pass for an expert scored by an earlier run, which kept no margins)."""
        metrics = fidelity.task_metrics(self.space)
        experts = fidelity.experts(self.space, self.store.references(self.space.study_name, Split.SEARCH))
        margins: Margins = {}
        for name in sorted(set(experts.values())):
            if name not in self.reference_margins:
                _, self.reference_margins[name] = score_reference(self.pool, name, Split.SEARCH, metrics)
            margins.update({t: m for t, m in self.reference_margins[name].items() if experts.get(t) == name})
        unordered = sorted(set(metrics) - set(margins))
        if unordered:
            self.notes.append(
                f"eval.fidelity.order margin: {', '.join(unordered)} gave no answer margins (not multiple choice), "
                "so their items keep the random order"
            )
            log.warning("%s", self.notes[-1])
        return margins

    # -- the IRT estimator (eval.estimator): calibrate once, re-score the front in full --------

    def calibrate(self) -> None:
        from evomerge.search.calibration import load_or_calibrate

        try:
            self.estimator = load_or_calibrate(
                self.study,
                self.pool,
                self.space,
                self.genome,
                evaluate_all=evaluate_all,
                on_phase=lambda count: self.bar.start_phase("calibration", count),
                on_done=self.bar.advance,
                on_merge=self.add_calibration_trial,
                on_reference=lambda name, scores: self.store.record_reference(
                    self.space.study_name, name, str(self.genome.paths[name]), "search", scores
                ),
            )
        except EvomergeError:
            raise
        except Exception as error:  # a setup problem (the evaluator, the metric), before any trial
            raise ReferenceScoringError(
                f"calibrating the IRT estimator (eval.estimator) failed: {short_error(error)}"
            ) from error
        finally:
            self.bar.close()

    def add_calibration_trial(self, params: dict[str, Any], distributions: dict[str, Any], result) -> None:
        from evomerge.search.calibration import record_calibration_trial

        self.lease.check()
        record_calibration_trial(self.study, self.store, self.space, self.genome, params, distributions, result)

    def rescore_front(self) -> None:
        from evomerge.search.calibration import parents_alone, rescore_front

        try:
            self.notes += rescore_front(
                self.space,
                self.store,
                self.pool,
                evaluate_all=evaluate_all,
                calibrated=parents_alone(self.study),
                on_phase=lambda count: self.bar.start_phase("rescore", count),
                on_done=self.bar.advance,
            )
        finally:
            self.bar.close()

    # -- successive halving ----------------------------------------------------------------

    def prepare_fidelity(self) -> None:
        """With eval.fidelity: the study's item order (drawn once, stored) and what each trial that
        did not fail reached at each rung (from the store, so a resumed run judges as before)."""
        spec = self.space.eval.fidelity
        if spec is None:
            return
        by_margin = self.expert_margins if spec.order == "margin" else None
        order = fidelity.study_item_order(self.store, self.space, self.pool.item_ids("search"), by_margin)
        self.ladder = fidelity.RungLadder.build(spec, order, source=self.space.source_path)
        pruner = pruners.make_pruner(self.space, self.ladder)
        if pruner is not None:
            self.study.pruner = pruner  # what Trial.should_prune asks
        failed = {r.number for r in self.store.trials(self.space.study_name, status="failed")}
        for number, rungs in self.store.rungs(self.space.study_name).items():
            fidelity.check_recorded_rungs(self.space, self.ladder, number, rungs)
            if number not in failed:
                for rung, (_, values) in rungs.items():
                    self.reached.setdefault(rung, {})[number] = values

    def submit(self, running: RunningTrial) -> None:
        """Hand a trial to a worker: every item, or (eval.fidelity) the items its rung adds."""
        if self.ladder is None:
            how = {"estimator": self.estimator} if self.estimator is not None else {}
            ticket = self.pool.submit(running.params, "search", **how)
        else:
            if running.rung == self.ladder.top:
                items = self.ladder.step_items(running.step)
            else:
                items = self.ladder.new_items(running.rung)
            ticket = self.pool.submit(running.params, "search", items=items)
        self.in_flight[ticket] = running

    def climb(self, running: RunningTrial, result) -> tuple[list[float], BaseException | None, Any]:
        """One rung's outcome: the trial's values over every item it has scored, or why it failed;
        the result carries those scores and the time of all its rungs."""
        running.merge_seconds += result.merge_seconds
        running.eval_seconds += result.eval_seconds
        try:
            new = result.item_scores
            if new is None:
                raise fidelity.FidelityError("eval.fidelity: the worker returned no per-item values")
            fidelity.check_means(self.space, result.scores, new)
            running.item_scores = fidelity.merge_item_scores(running.item_scores, new)
            scores, values = fidelity.rung_values(self.space, running.item_scores)
            if any(math.isnan(v) for v in values):
                raise FloatingPointError(f"an objective is NaN: {values}")
        except fidelity.FidelityError:
            raise  # a setup problem: it stops the search (and `abandon` fails what is in flight)
        except Exception as problem:
            return [], problem, result
        combined = replace(
            result, scores=scores, merge_seconds=running.merge_seconds, eval_seconds=running.eval_seconds
        )
        return values, None, combined

    def record_rung(self, running: RunningTrial, values: list[float]) -> list[list[float]]:
        """Store the trial's values at its rung (in the trial store, and on the optuna trial for the
        dashboard and for TPE's rung model); the values of the rung's other trials (its rivals)."""
        from evomerge.search.tpe import rung_values_attr

        number, rung = running.trial.number, running.rung
        self.store.record_rung(self.space.study_name, number, rung, items=self.ladder.items(rung), values=values)
        running.trial.set_user_attr(
            rung_values_attr(rung), [None if math.isnan(v) else float(v) for v in told_values(self.space, values)]
        )
        if self.space.eval.fidelity.pruner != "evomerge":
            pruners.report_rung(running.trial, self.space, self.ladder, rung, values, running.item_scores)
        rivals = [v for n, v in self.reached.get(rung, {}).items() if n != number]
        self.reached.setdefault(rung, {})[number] = values
        return rivals

    def promote_or_prune(self, running: RunningTrial, result, values: list[float]) -> bool:
        """Below the top rung: hand the trial on to the next rung (True), or stop it here (False)."""
        rivals = self.record_rung(running, values)
        if self.space.eval.fidelity.pruner != "evomerge":
            goes_up = not running.trial.should_prune()
        else:
            spec = self.space.eval.fidelity
            top = self.ladder.top
            goes_up = fidelity.promoted(self.space, values, rivals, spec.eta) and not (
                spec.race  # guards the full budget, the costly step: the last rung below it only
                and running.rung == top - 1
                and fidelity.behind_the_best(self.space, values, self.reached, running.rung, top)
            )
            if goes_up and self.capped(running):
                self.stop_capped(running, result, values)
                return False
        if goes_up:
            running.rung += 1
            self.submit(running)
            return True
        self.prune(running, result, values)
        return False

    def capped(self, running: RunningTrial) -> bool:
        """`cap`: whether the best trials scored in full are out of this trial's reach."""
        if not self.space.eval.fidelity.cap:
            return False
        top = self.ladder.top
        full = {n: v for n, v in self.reached.get(top, {}).items() if n != running.trial.number}
        return fidelity.out_of_reach(self.space, running.item_scores, self.ladder.sizes[top], full)

    def next_step_or_cap(self, running: RunningTrial, result) -> bool:
        """At a step of the top rung (`cap`): score its next step (True), or stop the trial here, stored
        at the rung below the top, where it last finished a rung (False)."""
        if not self.capped(running):
            running.step += 1
            self.submit(running)
            return True
        below = self.ladder.top - 1
        self.stop_capped(running, result, self.reached[below][running.trial.number], rung=below)
        return False

    def stop_capped(self, running: RunningTrial, result, values: list[float], *, rung: int | None = None) -> None:
        """Stop a trial that capping put out of reach: pruned at `rung` (default: its own), with how
        many of the full budget's items it had scored kept in the store and on its label."""
        scored, full = self.items_scored(running), self.ladder.items(self.ladder.top)
        self.prune(running, result, values, rung=rung, why=f"capped after {scored} of {full} items")
        self.store.record_capped(self.space.study_name, running.trial.number, items=scored, of=full)

    def prune(
        self, running: RunningTrial, result, values: list[float], *, rung: int | None = None, why: str = "stopped"
    ) -> None:
        """Store a trial stopped below the top rung, then tell optuna PRUNED without values.

        Why PRUNED: optuna's samplers never read a low-rung score as if it were a full one.
        NSGA-II and random sampling ignore pruned trials; evomerge's TPE keeps them out of its
        good group, or ranks them by their values at the rung it models (search/tpe.py: optuna's
        would fill it with the earliest pruned trials while complete ones are few); CMA-ES reads
        a pruned trial only with `consider_pruned_trials` (off by default) and an intermediate
        value (reported only under an optuna pruner). Telling the low-rung values as COMPLETE
        would instead mix 25-item means with full-set ones.
        """
        from optuna.trial import TrialState

        trial = running.trial
        self.store.prune_trial(
            self.space.study_name,
            trial.number,
            values=values,
            **stored_fields(result),
        )
        seconds = {"merge": result.merge_seconds, "eval": result.eval_seconds}
        at = self.ladder.describe(running.rung if rung is None else rung)
        self.label(running, result, values, seconds=seconds, rung=f"{at}, {why}")
        tell(self.study, trial, state=TrialState.PRUNED)

    def trial_report(self, running: RunningTrial, result, values: list[float]) -> dict[str, Any]:
        """What on_trial gets for a finished trial (`rung` and `items` are None at full fidelity)."""
        return {
            "number": running.trial.number,
            "wall_seconds": time.perf_counter() - running.asked,
            "values": values,
            "merge_seconds": result.merge_seconds,
            "eval_seconds": result.eval_seconds,
            "hash_seconds": result.extra.get("hash_seconds", 0.0),
            "worker": result.worker,
            "rung": None if self.ladder is None else running.rung,
            "items": None if self.ladder is None else self.items_scored(running),
            "pruned": False,
        }

    def items_scored(self, running: RunningTrial) -> int:
        """Items the trial has scored, every task together (within the top rung: up to its step)."""
        if running.rung < self.ladder.top:
            return self.ladder.items(running.rung)
        return self.ladder.step_total(running.step)

    # -- the search phase -------------------------------------------------------------------

    def search(self) -> None:
        """Keep the workers busy until n_trials trials have finished (or the timeout stops new ones)."""
        self.start_search_phase()
        try:
            while True:
                self.fill_workers()
                if not self.in_flight and not self.pool.recovering():
                    break
                outcome = self.pool.wait_any()
                if outcome is not None:  # None: a restarted worker is back; go and give it work
                    self.take(outcome)
        except BaseException as error:
            # Outside a trial's own failure policy (the store, optuna, the pool, Ctrl-C): no trial of
            # this driver stays RUNNING; each is failed with the reason and its genome queued again.
            abandon(self.study, self.store, self.space, self.held(), error, self.lease)
            raise
        finally:
            self.bar.close()

    def start_search_phase(self) -> None:
        self.bar.start_phase("search", self.total, done=finished_count(self.study))
        # Values of completed trials, kept in memory for the progress bar (no database read per trial).
        seen = compute_front(self.space, self.store)
        self.search_values = [row.search for row in seen]
        leader = max(seen, key=lambda row: scalarize(self.space, row.search), default=None)
        self.best_score = scalarize(self.space, leader.search) if leader else -math.inf
        self.bar.update(
            front=len(seen), failed=self.failed_count(), best=(leader.number, leader.mean()) if leader else None
        )

    def fill_workers(self) -> None:
        while not self.stopping and len(self.in_flight) < self.pool.size and self.pool.can_submit():
            if not self.room_for_another():
                break
            self.lease.check()  # never ask for a trial of a study another driver has taken over
            self.start_trial()

    def room_for_another(self) -> bool:
        """False once n_trials are finished or running, or (noted once) past the timeout."""
        if self.total is not None and finished_count(self.study) + len(self.in_flight) >= self.total:
            return False
        if self.limit is not None and time.monotonic() - self.started > self.limit:
            self.notes.append(f"stopped starting trials after the {self.limit:.0f}s timeout")
            self.stopping = True
            return False
        return True

    def start_trial(self) -> None:
        from evomerge.search.storage import batched_params

        asked = time.perf_counter()
        self.asking = RunningTrial(self.study.ask(), None, asked)
        with batched_params(self.study):  # one transaction for all genes, committed before the merge
            self.asking.params = self.genome.suggest(self.asking.trial)
        self.store.start_trial(
            self.space.study_name, self.asking.trial.number, self.asking.params, worker=getattr(self.pool, "name", None)
        )
        self.submit(self.asking)
        self.asking = None
        self.bar.update(in_flight=len(self.in_flight))

    def take(self, outcome) -> None:
        """One trial's outcome, through the one failure policy: any failure fails the trial, never the study."""
        running = self.reporting = self.in_flight.pop(outcome.ticket)
        self.bar.update(in_flight=len(self.in_flight))
        values, error = outcome_values(self.space, outcome)
        result = outcome.result
        if error is None and self.ladder is not None:
            values, error, result = self.climb(running, result)
        self.lease.check()  # the trial is another driver's now: tell optuna nothing
        if error is not None:
            self.fail(running, error, retry=outcome.worker_died)
            self.reporting = None
            self.bar.update(failed=self.failed_count())
        elif self.ladder is not None and (running.rung < self.ladder.top or running.step < len(self.ladder.steps)):
            if running.rung < self.ladder.top:
                went_up = self.promote_or_prune(running, result, values)
            else:
                went_up = self.next_step_or_cap(running, result)
            self.reporting = None
            self.bar.update(in_flight=len(self.in_flight))
            if went_up:
                return  # the same trial, in flight again at the next rung
            if self.on_trial is not None:
                self.on_trial(self.trial_report(running, result, values) | {"pruned": True})
        else:
            if self.ladder is not None:
                self.record_rung(running, values)
            self.complete(running, result, values)
            self.reporting = None
            self.report(running, result, values)
        self.bar.advance()

    def fail(self, running: RunningTrial, error: BaseException, *, retry: bool) -> None:
        """Store and tell the failure; a genome whose worker died is queued once more."""
        from optuna.trial import TrialState

        trial, reason = running.trial, short_error(error)
        log.warning("trial %d failed: %s", trial.number, reason)
        self.store.fail_trial(self.space.study_name, trial.number, reason)
        for reached in self.reached.values():  # a failed trial is nobody's rival (its retry is)
            reached.pop(trial.number, None)
        trial.set_user_attr("failure", reason)
        trial.set_user_attr("methods", annotate.methods_line(self.genome, running.params))
        tell(self.study, trial, state=TrialState.FAIL)
        if retry and trial.user_attrs.get("retry_of") is None:
            self.study.enqueue_trial(running.params, user_attrs={"retry_of": trial.number})

    def complete(self, running: RunningTrial, result, values: list[float]) -> None:
        """Store the trial, then label it for the dashboard, then tell optuna (the store comes first)."""
        trial, told = running.trial, told_values(self.space, values)
        self.store.finish_trial(
            self.space.study_name,
            trial.number,
            scores=result.scores,
            values=told,
            **stored_fields(result),
        )
        seconds = {
            "merge": result.merge_seconds,
            "hash": result.extra.get("hash_seconds"),
            "eval": result.eval_seconds,
            "trial": time.perf_counter() - running.asked,
        }
        rung = None if self.ladder is None else self.ladder.describe(running.rung)
        self.label(running, result, values, seconds=seconds, rung=rung)
        tell(self.study, trial, told)  # every other detail is in the trial store

    def label(
        self, running: RunningTrial, result, values: list[float], *, seconds: dict[str, Any], rung: str | None
    ) -> None:
        """What the dashboard shows of a scored trial (complete, or stopped at a rung)."""
        annotate.set_trial_attrs(
            running.trial,
            annotate.search_attrs(
                [o.label for o in self.space.objectives],
                values,
                methods=annotate.methods_line(self.genome, running.params),
                weights_hash=result.weights_hash,
                role_text=annotate.role(running.trial.user_attrs),
                seconds=seconds,
                rung=rung,
            ),
        )

    def report(self, running: RunningTrial, result, values: list[float]) -> None:
        """A completed trial to the caller's on_trial and to the progress bar."""
        number = running.trial.number
        if self.on_trial is not None:
            self.on_trial(self.trial_report(running, result, values))
        if scalarize(self.space, values) > self.best_score:
            self.best_score = scalarize(self.space, values)
            self.bar.update(best=(number, annotate.mean(values)))
        self.search_values.append(values)
        self.bar.update(front=len(pareto_front(self.search_values, [o.direction for o in self.space.objectives])))

    def held(self) -> list[tuple[Any, dict[str, Any] | None]]:
        """The trials this driver holds and has not told optuna about: (trial, genome or None)."""
        held = [(running.trial, running.params) for running in self.in_flight.values()]
        if self.asking is not None:
            held.append((self.asking.trial, None))
        if self.reporting is not None:
            held.append((self.reporting.trial, self.reporting.params))
        return held

    def failed_count(self) -> int:
        return len(self.store.trials(self.space.study_name, status="failed"))

    # -- selection and the summary ----------------------------------------------------------

    def select_finalists(self) -> list[FrontRow]:
        """Re-score the best front members on held-out tasks before anything is called best; the front after."""
        front = compute_front(self.space, self.store)
        if not self.pool.has_selection:
            return front
        try:
            unscored = self.unscored_references("selection")
            jobs = [
                (row.number, self.store.trial(self.space.study_name, row.number).genome)
                for row in front[: self.space.search.finalists]
                if row.selection is None
            ]
            if unscored or jobs:
                self.bar.start_phase("selection", len(unscored) + len(jobs))
            self.score_references(unscored, "selection")
            self.score_finalists(jobs)
        except Exception as error:  # every trial is told already: keep the search, report the phase
            if isinstance(error, EvomergeError) and not isinstance(error, ReferenceScoringError):
                raise
            reason = short_error(error)
            self.notes.append(f"selection phase stopped ({reason}); the best is picked from what was scored")
        finally:
            self.bar.close()
        return compute_front(self.space, self.store)

    def score_finalists(self, jobs: Sequence[tuple[int, Mapping[str, Any]]]) -> None:
        for number, outcome in evaluate_all(self.pool, jobs, "selection", on_done=self.bar.advance).items():
            if outcome.error is None:
                self.store.record_scores(self.space.study_name, number, "selection", outcome.result.scores)
            else:
                self.selection_errors[number] = short_error(outcome.error)
                self.notes.append(f"trial {number}: selection scoring failed ({self.selection_errors[number]})")

    def summarise(self, front: list[FrontRow]) -> SearchSummary:
        best = pick_best(self.space, front)
        if self.estimator is not None:
            self.report_fidelity()
        if best is not None:
            self.lease.check()
            self.study.set_user_attr("evomerge_best_trial", best.number)
        self.note_dashboard(finished=True, front=front, best=best)
        trials = self.store.trials(self.space.study_name)
        return SearchSummary(
            study_name=self.space.study_name,
            storage_url=self.space.storage_url,
            objective_names=[o.label for o in self.space.objectives],
            n_complete=sum(t.status == "complete" for t in trials),
            n_failed=sum(t.status == "failed" for t in trials),
            n_pruned=sum(t.status == "pruned" for t in trials),
            front=front,
            references=reference_rows(self.space, self.store),
            best=best,
            seconds=time.monotonic() - self.started,
            space_path=str(self.space.source_path) if self.space.source_path else None,
            notes=self.notes,
        )

    def report_fidelity(self) -> None:
        """The estimator's rank correlation and error on the re-scored trials: a summary line, a log
        line and the study attribute `evomerge_irt_fidelity` (what `evomerge front` prints)."""
        from evomerge.search.calibration import FIDELITY_ATTR, estimator_fidelity, fidelity_line

        report = estimator_fidelity(self.space, self.store)
        line = fidelity_line(report, self.estimator.method)
        self.notes.append(line)
        log.info("%s", line)
        self.lease.check()
        self.study.set_user_attr(FIDELITY_ATTR, {"chosen": self.estimator.method, **report})

    def note_dashboard(
        self, *, finished: bool, front: list[FrontRow] | None = None, best: FrontRow | None = None
    ) -> None:
        """What the dashboard shows of the study: its attributes and note (parents, front, best), and at
        the end each finalist's note (held-out scores, the best marked)."""
        space, store, study = self.space, self.store, self.study
        try:
            front = compute_front(space, store) if front is None else front
            trials = {t.number: t for t in study.get_trials(deepcopy=False)}
            records = store.trials(space.study_name)
            seeds = {n: annotate.role(t.user_attrs) for n, t in trials.items() if t.user_attrs.get("seed")}
            references = reference_rows(space, store)
            names = [o.label for o in space.objectives]
            methods = None
            if best is not None and best.number in trials:
                methods = annotate.methods_line(self.genome, trials[best.number].params)
            attrs = annotate.study_attrs(names, references, best, seeds, finished=finished, methods=methods)
            annotate.set_study_attrs(study, attrs)
            annotate.write_note(
                study,
                None,
                annotate.study_note(
                    space.study_name,
                    space.objectives,
                    front,
                    references,
                    best=best,
                    seeds=seeds,
                    n_complete=sum(r.status == "complete" for r in records),
                    n_failed=sum(r.status == "failed" for r in records),
                    finalists=space.search.finalists,
                    finished=finished,
                    rungs=fidelity.rung_summary(store, space),
                ),
            )
            if finished:
                self.note_finalists(front, best, trials, names)
        except Exception as error:  # the notes are a view: never fail a search over them
            log.warning("could not write the dashboard notes: %s", short_error(error))

    def note_finalists(
        self, front: list[FrontRow], best: FrontRow | None, trials: Mapping[int, Any], names: list[str]
    ) -> None:
        errors = self.selection_errors
        noted = {r.number: r for r in front if r.selection or r.number in errors}
        if best is not None:
            noted[best.number] = best
        for number, row in noted.items():
            if number in trials:
                annotate.write_note(
                    self.study,
                    trials[number]._trial_id,
                    annotate.finalist_note(names, row.selection, is_best=row is best, error=errors.get(number)),
                )


def outcome_values(space: SearchSpace, outcome) -> tuple[list[float], BaseException | None]:
    """A trial outcome's objective values, or why it failed: the worker's error, a task or metric
    lm-eval did not report, or a NaN objective."""
    if outcome.error is not None:
        return [], outcome.error
    try:
        values = objective_values(space, outcome.result.scores)
        if any(math.isnan(v) for v in values):
            raise FloatingPointError(f"an objective is NaN: {values}")
    except Exception as problem:
        return [], problem
    return values, None


class ReferenceScoringError(EvomergeError):
    """A reference model (the base, a parent) could not be scored: a setup problem, not a trial's."""


def score_reference(
    pool, name: str, split: Split, margins_of: dict[str, str] | None = None
) -> tuple[Scores, Margins | None]:
    """A reference model's scores, and its answer margins on the tasks of `margins_of` (task ->
    metric) when given."""
    try:
        if margins_of is not None:
            return pool.score_reference_margins(name, split, margins_of)
        return pool.score_reference(name, split), None
    except EvomergeError:
        raise
    except Exception as error:
        raise ReferenceScoringError(
            f"scoring the reference model '{name}' on the {split} tasks failed ({short_error(error)}); "
            "check the objectives' tasks and the eval settings"
        ) from error


def evaluate_all(
    pool,
    jobs: Sequence[tuple[Any, Mapping[str, Any]]],
    split: Split,
    on_done: Callable[[], Any] | None = None,
    **how: Any,
) -> dict[Any, Any]:
    """Evaluate several genomes on `split`, up to pool.size at once; key -> outcome (on_done() after each).

    `how`: the worker's evaluate options (per_item, estimator), passed only when given.
    """
    pending = list(jobs)
    running: dict[int, Any] = {}
    outcomes = {}
    while pending or running:
        while pending and len(running) < pool.size and pool.can_submit():
            key, params = pending.pop(0)
            running[pool.submit(params, split, **how)] = key
        outcome = pool.wait_any()
        if outcome is not None:
            outcomes[running.pop(outcome.ticket)] = outcome
            if on_done is not None:
                on_done()
    return outcomes


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


def finished_count(study) -> int:
    """Trials that count against n_trials: finished ones (stopped at a low rung too), except failures whose genome was queued
    again (a worker died or the driver was interrupted): their retry takes their place; and failures interrupted before
    their genome was drawn: nothing of them was evaluated, and the sampler draws that genome anew."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if t.user_attrs.get("retry_of") is not None}
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(
        1 for t in trials if t.state in done and t.number not in retried and (t.params or t.state != TrialState.FAIL)
    )


def queue_again(study, trial, params: Mapping[str, Any]) -> None:
    """Enqueue a failed trial's genome once more, keeping which reference point it is."""
    attrs = {"retry_of": trial.number}
    if "seed" in trial.user_attrs:  # which reference point this genome is
        attrs["seed"] = trial.user_attrs["seed"]
    study.enqueue_trial(dict(params), user_attrs=attrs, skip_if_exists=False)


def abandon(study, store: TrialRecorder, space: SearchSpace, held, error: BaseException, lease) -> None:
    """Fail the trials this driver holds (store and optuna alike) and queue their genomes again.

    Best effort: with the database gone, the next run's recovery does the same.
    """
    from optuna.trial import TrialState

    if lease.lost:
        return  # a driver that lost its lease leaves the trials to the one that took over
    cause = stop_reason(error) or short_error(error)
    reason = f"search stopped before this trial finished: {cause}"
    for trial, params in [*held, *unheld_running(study, held)]:
        try:
            genome = dict(params or trial.params or fixed_params(study, trial))
            if store.trial(space.study_name, trial.number) is None:
                store.start_trial(space.study_name, trial.number, genome)
            store.fail_trial(space.study_name, trial.number, reason)
            trial.set_user_attr("failure", reason)
            tell(study, trial, state=TrialState.FAIL)
            if genome and trial.user_attrs.get("retry_of") is None:
                queue_again(study, trial, genome)
        except Exception as problem:  # noqa: BLE001 - the original error is the one to report
            why = short_error(problem)
            log.warning("trial %d: could not be failed after the search stopped: %s", trial.number, why)


def unheld_running(study, held) -> list[tuple[Any, None]]:
    """RUNNING trials of the study that the driver does not hold: one `study.ask()` created before
    an interrupt arrived inside it. The lease makes every RUNNING trial this driver's own."""
    from optuna.trial import Trial, TrialState

    try:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:  # noqa: BLE001 - best effort, as for the held ones; the next run recovers them
        return []
    numbers = {trial.number for trial, _ in held}
    return [(Trial(study, frozen._trial_id), None) for frozen in running if frozen.number not in numbers]


def fixed_params(study, trial) -> dict[str, Any]:
    """An enqueued trial's genome as optuna holds it before its genes are suggested."""
    try:
        return dict(study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params") or {})
    except Exception:  # noqa: BLE001 - nothing to retry then
        return {}


def tell(study, trial, values=None, *, state=None) -> None:
    """study.tell without reading the finished trial back (tell returns it; we never use it)."""
    try:
        from optuna.study._tell import _tell_with_warning
    except ImportError:  # another optuna layout: the public call does the same, plus the read
        study.tell(trial, values, state=state)
        return
    _tell_with_warning(study=study, trial=trial, value_or_values=values, state=state)
