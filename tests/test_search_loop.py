"""The search loop's failure policy and its sampler, run through `run_search` with a scripted pool:
no Ray, no lm-eval, no merge. The pool scores a genome by a fixed function of its genes, and each
submission does what the test's script says (complete, raise, lose its worker, report NaN or no task).

After every run the trial store and optuna agree on every trial and n_trials holds.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import optuna
import pytest
from test_search_e2e import write_space

from evomerge.config.space import load_space
from evomerge.errors import EvomergeError
from evomerge.genome.parameters import ParameterGenome as Genome
from evomerge.search.runner import run_search
from evomerge.store.trial_store import TrialStore

STATES = {"COMPLETE": "complete", "FAIL": "failed"}


def digest(params) -> bytes:
    """A genome's fingerprint: its scores and its weights hash are read from it."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).digest()


@dataclass
class Result:
    """What a worker returns for one genome (the attributes the loop reads)."""

    scores: dict[str, dict[str, float]]
    weights_hash: str
    merge_seconds: float = 0.01
    eval_seconds: float = 0.02
    device: str = "cpu"
    plan_yaml: str = "# scripted"
    worker: str = "scripted"
    extra: dict[str, Any] = field(default_factory=dict)
    item_scores: dict | None = None  # per-item values, when the loop asked for items


@dataclass
class Outcome:
    ticket: int
    result: Result | None = None
    error: BaseException | None = None
    worker_died: bool = False


class ScriptedPool:
    """A one-worker pool whose n-th search submission does `script[n]` ("ok" once the script ends)."""

    size = 1
    name = "scripted"
    has_selection = True

    def __init__(self, space, script=(), *, selection_script=(), reference_error: BaseException | None = None):
        self.space = space
        self.genome = Genome(space)
        self.script = list(script)
        self.selection_script = list(selection_script)
        self.reference_error = reference_error
        self.queue: list[tuple[int, dict[str, Any], str]] = []
        self.submitted: list[tuple[dict[str, Any], str]] = []

    def can_submit(self) -> bool:
        return True

    def recovering(self) -> bool:
        return False

    def submit(self, params, split="search") -> int:
        self.submitted.append((dict(params), split))
        self.queue.append((len(self.submitted), dict(params), split))
        return len(self.submitted)

    def wait_any(self, timeout=None) -> Outcome | None:
        ticket, params, split = self.queue.pop(0)
        script = self.script if split == "search" else self.selection_script
        action = script.pop(0) if script else "ok"
        if isinstance(action, BaseException):
            raise action
        if action == "error":
            return Outcome(ticket, error=RuntimeError("CUDA out of memory"))
        if action == "died":
            return Outcome(ticket, error=RuntimeError("the worker process died"), worker_died=True)
        scores = self.scores(params, split)
        if action == "nan":
            scores = {task: {"acc,none": math.nan} for task in scores}
        if action == "no task":
            scores = {}
        return Outcome(ticket, result=Result(scores, digest(params).hex()))

    def scores(self, params, split) -> dict[str, dict[str, float]]:
        tasks = [o.task if split == "search" else o.selection_task for o in self.space.objectives]
        return {task: {"acc,none": digest(params)[i] / 255} for i, task in enumerate(tasks)}

    def score_reference(self, name, split) -> dict:
        if self.reference_error is not None:
            raise self.reference_error
        return self.scores({"reference": name}, split)

    def close(self) -> None:
        pass


def study_and_store(space):
    study = optuna.load_study(study_name=space.study_name, storage=space.storage_url)
    records = {r.number: r for r in TrialStore(space.storage_url).trials(space.study_name)}
    started = [t for t in study.trials if t.state.name != "WAITING"]  # a queued genome has no store row yet
    states = {t.number: STATES.get(t.state.name, t.state.name) for t in started}
    assert states == {n: r.status for n, r in records.items()}
    return study, records


@pytest.fixture
def make_space(tmp_path, demo_family):
    def make(**search):
        search = {"sampler": "random", "enqueue": [], "finalists": 0, **search}
        return load_space(write_space(tmp_path, demo_family, **search))

    return make


def test_a_failed_trial_is_stored_and_told_and_the_search_goes_on(make_space):
    space = make_space(n_trials=5)
    pool = ScriptedPool(space, ["ok", "error", "nan", "no task", "ok"])
    summary = run_search(space, pool=pool, progress=False)
    study, records = study_and_store(space)
    assert (summary.n_complete, summary.n_failed, len(study.trials)) == (2, 3, 5)  # failures are not retried
    assert records[1].failure == "RuntimeError: CUDA out of memory"
    assert records[2].failure.startswith("FloatingPointError: an objective is NaN")
    assert records[3].failure.startswith('KeyError: "lm-eval returned no results for task')
    assert study.trials[1].user_attrs["failure"] == "RuntimeError: CUDA out of memory"
    assert "methods" in study.trials[1].user_attrs
    assert {row.number for row in summary.front} <= {0, 4}


def test_a_trial_whose_worker_died_is_queued_once_more_in_its_own_place(make_space):
    space = make_space(n_trials=3)
    pool = ScriptedPool(space, ["ok", "died", "died", "ok"])
    summary = run_search(space, pool=pool, progress=False)
    study, records = study_and_store(space)
    states = [t.state.name for t in study.trials]
    # trial 1 died and was queued again as trial 2, which died too: that one is not retried
    assert states == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert study.trials[2].user_attrs["retry_of"] == 1 and study.trials[2].params == study.trials[1].params
    assert "retry_of" not in study.trials[3].user_attrs
    assert (summary.n_complete, summary.n_failed) == (2, 2)


def test_an_error_outside_a_trial_fails_the_trial_in_flight_and_queues_it_again(make_space):
    space = make_space(n_trials=4)
    pool = ScriptedPool(space, ["ok", KeyboardInterrupt()])
    with pytest.raises(KeyboardInterrupt):
        run_search(space, pool=pool, progress=False)
    study, records = study_and_store(space)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert records[1].failure == "search stopped before this trial finished: interrupted (Ctrl-C)"
    assert study.trials[2].user_attrs["retry_of"] == 1

    summary = run_search(space, pool=ScriptedPool(space), progress=False)  # the next run takes the queued genome
    study, _ = study_and_store(space)
    assert study.trials[2].params == study.trials[1].params
    assert (summary.n_complete, summary.n_failed) == (4, 1)


def test_an_interrupt_inside_study_ask_leaves_no_trial_running(make_space, monkeypatch):
    """Ctrl-C can land after optuna created the trial but before ask() returned it to the loop."""
    space = make_space(n_trials=4)
    asks = []
    real_ask = optuna.Study.ask

    def ask(study, *args, **kwargs):
        trial = real_ask(study, *args, **kwargs)
        asks.append(trial.number)
        if len(asks) == 2:
            raise KeyboardInterrupt
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask)
    with pytest.raises(KeyboardInterrupt):
        run_search(space, pool=ScriptedPool(space), progress=False)
    monkeypatch.undo()
    study, records = study_and_store(space)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]  # no genome drawn: nothing to queue
    assert records[1].failure == "search stopped before this trial finished: interrupted (Ctrl-C)"

    summary = run_search(space, pool=ScriptedPool(space), progress=False)
    # as after a SIGKILL there: failed, not retried, and not one of the 4 trials asked for
    assert (summary.n_complete, summary.n_failed) == (4, 1)


def test_finalists_are_rescored_on_held_out_tasks_and_a_failed_one_is_noted(make_space):
    space = make_space(n_trials=4, finalists=2)
    pool = ScriptedPool(space, selection_script=["ok", "error"])
    summary = run_search(space, pool=pool, progress=False)
    finalists = [params for params, split in pool.submitted if split == "selection"]
    assert len(summary.front) >= 2 and len(finalists) == 2  # the two best of the front
    assert sum(row.selection is not None for row in summary.front) == 1
    assert any("selection scoring failed (RuntimeError: CUDA out of memory)" in note for note in summary.notes)
    references = TrialStore(space.storage_url).references(space.study_name, "selection")
    assert set(references) == {"base", *pool.genome.finetunes}
    assert summary.best is not None


def test_a_reference_that_cannot_be_scored_stops_the_search_before_any_trial(make_space):
    space = make_space(n_trials=2, enqueue=["parents", "uniform"])
    pool = ScriptedPool(space, reference_error=RuntimeError("no such task"))
    with pytest.raises(EvomergeError, match="scoring the reference model 'base' on the search tasks failed"):
        run_search(space, pool=pool, progress=False)
    assert optuna.load_study(study_name=space.study_name, storage=space.storage_url).trials == []


class CountingSampler(optuna.samplers.RandomSampler):
    def __init__(self, seed: int):
        super().__init__(seed=seed)
        self.draws = 0

    def sample_independent(self, study, trial, param_name, param_distribution):
        self.draws += 1
        return super().sample_independent(study, trial, param_name, param_distribution)


def test_run_search_samples_with_a_sampler_object_it_is_given(make_space):
    space = make_space(n_trials=3)
    sampler = CountingSampler(seed=7)
    run_search(space, pool=ScriptedPool(space), progress=False, sampler=sampler)
    study, _ = study_and_store(space)
    assert sampler.draws == sum(len(t.params) for t in study.trials) > 0


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_run_search_takes_any_optuna_sampler_and_refuses_anything_else(make_space):
    space = make_space(n_trials=2)
    sampler = optuna.samplers.QMCSampler(seed=3, warn_independent_sampling=False)
    summary = run_search(space, pool=ScriptedPool(space), progress=False, sampler=sampler)
    assert summary.n_complete == 2
    with pytest.raises(TypeError, match="sampler must be an optuna.samplers.BaseSampler, not str"):
        run_search(space, pool=ScriptedPool(space), progress=False, sampler="tpe")
