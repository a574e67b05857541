"""BatchingRDBStorage: a trial's parameters in one transaction, and nothing else changed.

Runs on a SQLite file; with EVOMERGE_TEST_POSTGRES_URL set, on PostgreSQL too (unique study names).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from sqlalchemy import event

from evomerge.search.storage import BatchingRDBStorage, batched_params

REPO = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(not POSTGRES_URL, reason="set EVOMERGE_TEST_POSTGRES_URL to test PostgreSQL"),
        ),
    ]
)
def url(request, tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}" if request.param == "sqlite" else POSTGRES_URL


@pytest.fixture
def name() -> str:
    return f"batch-{uuid.uuid4().hex[:12]}"


def stored_params(url: str, name: str) -> dict[int, dict]:
    """Trial number -> params, read by a fresh plain optuna storage (what the dashboard sees)."""
    storage = optuna.storages.RDBStorage(url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        return {t.number: t.params for t in study.get_trials(deepcopy=False)}
    finally:
        storage.engine.dispose()


def suggest_all(trial) -> dict:
    return {
        "method": trial.suggest_categorical("method", ["ties", "task_arithmetic"]),
        **{f"w{i}": trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(6)},
    }


def count_commits(storage) -> list[int]:
    commits = [0]

    @event.listens_for(storage.engine, "commit")
    def _commit(_connection) -> None:
        commits[0] += 1

    return commits


def test_params_are_written_together_when_the_block_ends(url, name):
    storage = BatchingRDBStorage(url)
    study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    commits = count_commits(storage)
    with batched_params(study):
        params = suggest_all(trial)
        assert trial.params == params  # the trial sees its parameters at once
        assert stored_params(url, name)[trial.number] == {}  # the database does not yet
        assert commits[0] == 0
    assert commits[0] == 1
    assert stored_params(url, name)[trial.number] == params
    study.tell(trial, 0.5)
    frozen = study.get_trials()[0]
    assert frozen.params == params and frozen.distributions["method"] == CategoricalDistribution(
        ["ties", "task_arithmetic"]
    )


def test_outside_the_block_every_param_is_its_own_transaction(url, name):
    storage = BatchingRDBStorage(url)
    study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    commits = count_commits(storage)  # every session commits, reads too: a sampler that reads nothing
    trial.suggest_float("x", 0.0, 1.0)
    assert stored_params(url, name)[trial.number] == {"x": trial.params["x"]}
    trial.suggest_float("y", 0.0, 1.0)
    assert commits[0] == 2


def test_params_are_written_when_the_block_raises(url, name):
    storage = BatchingRDBStorage(url)
    study = optuna.create_study(study_name=name, storage=storage)
    trial = study.ask()
    with pytest.raises(RuntimeError, match="sampler broke"), batched_params(study):
        x = trial.suggest_float("x", 0.0, 1.0)
        raise RuntimeError("sampler broke")
    assert stored_params(url, name)[trial.number] == {"x": x}


def test_same_samples_and_stored_params_as_plain_storage(url, tmp_path):
    """A seeded TPE study samples the same genomes, and keeps the same params, with batching."""
    runs = {}
    for kind, storage_class in (("plain", optuna.storages.RDBStorage), ("batched", BatchingRDBStorage)):
        study_name = f"same-{kind}-{uuid.uuid4().hex[:8]}"
        study_url = f"sqlite:///{tmp_path / (kind + '.db')}" if url.startswith("sqlite") else url
        sampler = optuna.samplers.TPESampler(seed=3, n_startup_trials=3, multivariate=True)
        study = optuna.create_study(
            study_name=study_name,
            storage=storage_class(study_url),
            sampler=sampler,
            directions=["maximize", "maximize"],
        )
        study.enqueue_trial({"method": "ties", **{f"w{i}": 0.5 for i in range(6)}})
        for _ in range(8):
            trial = study.ask()
            with batched_params(study):
                params = suggest_all(trial)
            study.tell(trial, [sum(v for k, v in params.items() if k != "method"), float(params["method"] == "ties")])
        runs[kind] = [(t.params, t.values) for t in study.trials]
        assert stored_params(study_url, study_name) == {t.number: t.params for t in study.trials}
    assert runs["batched"] == runs["plain"]
    assert all(len(params) == 7 for params, _ in runs["batched"])


def test_an_incompatible_distribution_still_fails(url, name):
    storage = BatchingRDBStorage(url)
    study = optuna.create_study(study_name=name, storage=storage)
    first = study.ask()
    with batched_params(study):
        first.suggest_float("x", 0.0, 1.0)
    study.tell(first, 1.0)
    # A second process (no cached distribution) that asks for "x" as a categorical gene:
    other = optuna.load_study(study_name=name, storage=BatchingRDBStorage(url))
    trial = other.ask()
    with pytest.raises(ValueError, match="different distribution kind"), batched_params(other):
        trial.suggest_categorical("x", ["a", "b"])
    assert stored_params(url, name)[trial.number] == {}


def test_a_param_another_writer_stored_first_is_skipped(url, name):
    storage = BatchingRDBStorage(url)
    study = optuna.create_study(study_name=name, storage=storage)
    trial = study.ask()
    with batched_params(study):
        x = trial.suggest_float("x", 0.0, 1.0)
        y = trial.suggest_float("y", 0.0, 1.0)
        plain = optuna.storages.RDBStorage(url)
        plain.set_trial_param(trial._trial_id, "x", 0.25, FloatDistribution(0.0, 1.0))
        plain.engine.dispose()
    assert stored_params(url, name)[trial.number] == {"x": 0.25, "y": y} and x != 0.25


def test_sigkill_inside_the_block_loses_nothing_finished(url, name):
    """A process killed while suggesting: the finished trial has every param, the running one none."""
    code = """
        import os, signal, sys
        import optuna
        from evomerge.search.storage import BatchingRDBStorage, batched_params
        study = optuna.create_study(study_name=sys.argv[2], storage=BatchingRDBStorage(sys.argv[1]))
        for number in range(2):
            trial = study.ask()
            with batched_params(study):
                for i in range(5):
                    trial.suggest_float(f"w{i}", 0.0, 1.0)
                if number == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
            study.tell(trial, 1.0)
    """
    env = os.environ | {"PYTHONPATH": str(REPO)}
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), url, name], env=env, capture_output=True, timeout=120
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    storage = optuna.storages.RDBStorage(url)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert sorted(trials[0].params) == [f"w{i}" for i in range(5)] and trials[1].params == {}
    storage.engine.dispose()


def test_other_storages_and_pickling(tmp_path, name):
    study = optuna.create_study()  # in memory: the block does nothing
    trial = study.ask()
    with batched_params(study):
        x = trial.suggest_float("x", 0.0, 1.0)
    assert study.trials[0].params == {"x": x}
    storage = BatchingRDBStorage(f"sqlite:///{tmp_path / 'p.db'}")
    copy = pickle.loads(pickle.dumps(storage))
    study = optuna.create_study(study_name=name, storage=copy)
    trial = study.ask()
    with batched_params(study):
        y = trial.suggest_float("y", 0.0, 1.0)
    assert stored_params(copy.url, name)[trial.number] == {"y": y}


def test_runner_tell_finishes_trials_like_study_tell(url, name):
    from evomerge.search.loop import tell as _tell

    outcomes = {}
    for kind in ("study.tell", "_tell"):
        study = optuna.create_study(
            study_name=f"{name}-{kind}", storage=BatchingRDBStorage(url), directions=["maximize"] * 2
        )
        tell = (
            study.tell
            if kind == "study.tell"
            else lambda trial, values=None, state=None, study=study: _tell(study, trial, values, state=state)
        )
        good, bad = study.ask(), study.ask()
        tell(good, [0.25, 0.5])
        tell(bad, state=TrialState.FAIL)
        with pytest.raises(ValueError, match="Cannot tell a COMPLETE trial"):
            tell(good, [0.1, 0.1])
        outcomes[kind] = [
            (t.state, t.values) for t in optuna.load_study(study_name=f"{name}-{kind}", storage=url).trials
        ]
    assert outcomes["_tell"] == outcomes["study.tell"] == [(TrialState.COMPLETE, [0.25, 0.5]), (TrialState.FAIL, None)]


def same(ours, theirs) -> bool:
    """FrozenTrials (or lists of them) with equal fields; NaN equals NaN."""
    if isinstance(ours, list):
        return len(ours) == len(theirs) and all(same(a, b) for a, b in zip(ours, theirs))
    return repr(sorted(vars(ours).items())) == repr(sorted(vars(theirs).items()))


def test_reads_give_the_same_frozen_trials_as_rdbstorage(url, name):
    """get_trial / _get_trials / get_all_trials read through Core: the same FrozenTrials as optuna's ORM reads."""
    storage = BatchingRDBStorage(url)
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    for number in range(6):
        trial = study.ask()
        with batched_params(study):
            suggest_all(trial)
        trial.set_user_attr("seed", {"parent": number, "ok": True})
        storage.set_trial_system_attr(trial._trial_id, "note", [number, "x"])
        if number == 1:
            study.tell(trial, state=TrialState.FAIL)
        elif number == 2:
            storage.set_trial_intermediate_value(trial._trial_id, 1, 0.5)
            storage.set_trial_intermediate_value(trial._trial_id, 2, float("nan"))
            study.tell(trial, state=TrialState.PRUNED)
        elif number < 5:
            study.tell(trial, [float("inf"), -0.25 * number])
    study.enqueue_trial({"method": "ties", "w0": 0.75}, user_attrs={"retry_of": 0})  # WAITING
    plain = optuna.storages.RDBStorage(url)
    study_id = study._study_id
    ids = [t._trial_id for t in plain.get_all_trials(study_id)]
    assert len(ids) == 7
    for trial_id in ids:
        assert same(storage.get_trial(trial_id), plain.get_trial(trial_id))
    for states in (
        None,
        (TrialState.COMPLETE,),
        (TrialState.RUNNING, TrialState.WAITING),
        (TrialState.PRUNED, TrialState.FAIL),
    ):
        ours, theirs = storage.get_all_trials(study_id, states=states), plain.get_all_trials(study_id, states=states)
        assert ours and same(ours, theirs)
    for included, greater in ((set(), -1), ({ids[1], ids[5]}, ids[3]), (set(), ids[4]), ({ids[6]}, ids[2])):
        ours, theirs = (
            storage._get_trials(study_id, None, included, greater),
            plain._get_trials(study_id, None, included, greater),
        )
        assert ours and same(ours, theirs)
    complete = [t for t in storage.get_all_trials(study_id) if t.state == TrialState.COMPLETE]
    assert complete[0].values[0] == float("inf") and complete[0].user_attrs["seed"] == {"parent": 0, "ok": True}
    assert storage.get_all_trials(study_id, states=(TrialState.PRUNED,))[0].intermediate_values[1] == 0.5
    with pytest.raises(KeyError):
        storage.get_trial(max(ids) + 1000)
    with pytest.raises(KeyError):
        storage._get_trials(study_id + 1000, None, set(), -1)
    plain.engine.dispose()


def test_fast_storage_only_on_a_tested_optuna(monkeypatch, tmp_path):
    """Private optuna internals are used only where they were tested; elsewhere optuna's own."""
    from evomerge.search import storage as storage_module

    assert storage_module.supported()  # the pinned optuna (constraints.txt) is a tested one
    assert storage_module.supported("5.0.3") and not storage_module.supported("4.2.1")
    assert not storage_module.supported("5.1.0")
    url = f"sqlite:///{tmp_path / 'v.db'}"
    assert type(storage_module.make_storage(url)) is storage_module.BatchingRDBStorage
    monkeypatch.setattr(storage_module, "TESTED_OPTUNA", ())
    plain = storage_module.make_storage(url)
    assert type(plain) is optuna.storages.RDBStorage
    study = optuna.create_study(storage=plain, study_name="plain")
    with storage_module.batched_params(study):  # a no-op block on the plain storage
        study.ask().suggest_float("x", 0, 1)
