"""The trial store: round trips, crash safety, concurrent writers, life beside an optuna study.

Runs on a SQLite file; set EVOMERGE_TEST_POSTGRES_URL (a `postgresql+psycopg://` URL of a
scratch database) to run every test against PostgreSQL too. Study names are unique per test, so
a shared database works.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from evomerge.store import StudyInfo, TrialRecord, TrialStore

REPO = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
OUR_TABLES = {
    "evomerge_studies",
    "evomerge_trials",
    "evomerge_scores",
    "evomerge_references",
    "evomerge_reference_scores",
}


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
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return POSTGRES_URL


@pytest.fixture
def study() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(url):
    with TrialStore(url) as trial_store:
        yield trial_store


def run_child(code: str, *args: str, wait: bool = True) -> subprocess.Popen:
    """Run `code` in a fresh interpreter (argv[1:] = args), as a separate writer would."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if wait:
        process.wait(timeout=60)
    return process


def finish(store: TrialStore, study: str, number: int, values=(0.5, 0.25)) -> None:
    store.finish_trial(
        study,
        number,
        values=list(values),
        plan_yaml=f"merge_method: linear  # trial {number}\n",
        merge_seconds=1.5,
        eval_seconds=2.5,
        device="cpu",
        weights_hash=f"{number:064x}",
    )


# ----------------------------------------------------------------------- studies


def test_save_study_round_trip_and_upsert(store, study):
    assert store.study_info(study) is None
    space = "models:\n  - path: a\n  - path: b\n# ünïcode kept as given\n"
    store.save_study(
        study,
        space_yaml=space,
        space_path="/spaces/space.yml",
        directions=["maximize", "minimize"],
        objective_names=["arc_easy/acc", "wikitext/word_perplexity"],
        objective_weights=[1, np.float64(0.5)],
    )
    info = store.study_info(study)
    assert isinstance(info, StudyInfo)
    assert (info.study, info.space_yaml, info.space_path) == (study, space, "/spaces/space.yml")
    assert info.directions == ["maximize", "minimize"]
    assert info.objective_names == ["arc_easy/acc", "wikitext/word_perplexity"]
    assert info.objective_weights == [1.0, 0.5]
    assert info.created_at.tzinfo == UTC

    store.save_study(
        study,
        space_yaml="changed",
        space_path="/other.yml",
        directions=["maximize"],
        objective_names=["acc"],
        objective_weights=[2.0],
    )
    again = store.study_info(study)
    assert (again.space_yaml, again.directions) == ("changed", ["maximize"])
    assert again.objective_weights == [2.0]
    assert again.created_at == info.created_at  # an upsert keeps when the study began
    assert again.updated_at >= info.updated_at
    assert study in store.studies()


def test_save_study_rejects_mismatched_objectives(store, study):
    with pytest.raises(ValueError, match="one of each per objective"):
        store.save_study(
            study,
            space_yaml="",
            space_path="",
            directions=["maximize"],
            objective_names=["a", "b"],
            objective_weights=[1.0],
        )
    with pytest.raises(ValueError, match="'maximize' or 'minimize'"):
        store.save_study(
            study, space_yaml="", space_path="", directions=["up"], objective_names=["a"], objective_weights=[1.0]
        )


def test_studies_lists_described_studies_and_studies_with_trials(store, study):
    store.save_study(
        study + "-a",
        space_yaml="",
        space_path="",
        directions=["maximize"],
        objective_names=["a"],
        objective_weights=[1.0],
    )
    store.start_trial(study + "-b", 0, {})
    names = store.studies()
    assert {study + "-a", study + "-b"} <= set(names)
    assert names == sorted(names)


# ------------------------------------------------------------------------ trials


def test_trial_lifecycle_round_trip(store, study):
    before = datetime.now(UTC) - timedelta(seconds=1)
    genome = {"t": np.float64(0.25), "layers": np.int64(3), "method": "ties", "w": (0.5, 0.5)}
    store.start_trial(study, 3, genome, worker="gpu-0")
    running = store.trial(study, 3)
    assert isinstance(running, TrialRecord)
    assert running.status == "running"
    assert running.genome == {"t": 0.25, "layers": 3, "method": "ties", "w": [0.5, 0.5]}
    assert (running.plan_yaml, running.values, running.finished_at) == ("", None, None)
    assert running.worker == "gpu-0"

    store.finish_trial(
        study,
        3,
        values=[np.float32(0.5), float("nan"), float("inf"), -float("inf")],
        plan_yaml="merge_method: ties\n",
        merge_seconds=np.float64(1.25),
        eval_seconds=3,
        device="cuda:0 (NVIDIA H100)",
        weights_hash="ab" * 32,
    )
    done = store.trial(study, 3)
    assert done.status == "complete"
    assert done.values[0] == 0.5 and math.isnan(done.values[1])
    assert done.values[2:] == [math.inf, -math.inf]
    assert all(type(v) is float for v in done.values)
    assert (done.merge_seconds, done.eval_seconds) == (1.25, 3.0)
    assert (done.device, done.weights_hash) == ("cuda:0 (NVIDIA H100)", "ab" * 32)
    assert done.plan_yaml == "merge_method: ties\n"
    assert done.failure is None
    # What start_trial wrote survives finish_trial.
    assert (done.genome, done.worker) == (running.genome, "gpu-0")
    assert done.started_at == running.started_at
    assert done.started_at.tzinfo == UTC and done.finished_at.tzinfo == UTC
    assert before <= done.started_at <= done.finished_at <= datetime.now(UTC)


def test_trials_are_ordered_and_filtered(store, study):
    for number in (5, 1, 3, 0):
        store.start_trial(study, number, {"n": number})
    finish(store, study, 1)
    finish(store, study, 5)
    store.fail_trial(study, 3, "out of memory")
    assert [t.number for t in store.trials(study)] == [0, 1, 3, 5]
    assert [t.number for t in store.trials(study, status="complete")] == [1, 5]
    assert [t.number for t in store.trials(study, status="failed")] == [3]
    assert [t.number for t in store.trials(study, status="running")] == [0]
    assert store.trials("no-such-study") == []
    assert store.trial(study, 99) is None
    with pytest.raises(ValueError, match="use one of running, complete, failed"):
        store.trials(study, status="done")


def test_fail_trial_keeps_one_line_and_no_values(store, study):
    store.start_trial(study, 0, {"t": 0.5}, worker="w")
    store.fail_trial(
        study,
        0,
        "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n",
        plan_yaml="merge_method: dare_ties\n",
        merge_seconds=2.0,
        device="cuda:0",
    )
    failed = store.trial(study, 0)
    assert failed.status == "failed"
    assert failed.failure == ("Traceback (most recent call last): ... RuntimeError: CUDA out of memory")
    assert failed.values is None
    assert failed.plan_yaml == "merge_method: dare_ties\n"
    assert (failed.merge_seconds, failed.eval_seconds) == (2.0, None)
    assert (failed.device, failed.genome, failed.worker) == ("cuda:0", {"t": 0.5}, "w")
    assert failed.finished_at is not None

    store.fail_trial(study, 1, "x" * 10_000)  # never started: still recorded
    assert len(store.trial(study, 1).failure) <= 2000


def test_finish_without_start_and_restart_resets(store, study):
    finish(store, study, 4)
    orphan = store.trial(study, 4)
    assert (orphan.status, orphan.genome, orphan.started_at) == ("complete", {}, None)

    store.start_trial(study, 4, {"again": True}, worker="w2")  # a re-run starts clean
    again = store.trial(study, 4)
    assert (again.status, again.values) == ("running", None)
    assert (again.plan_yaml, again.weights_hash) == ("", None)
    assert again.genome == {"again": True}


def test_fail_running(store, study):
    store.start_trial(study, 0, {}, worker="a")
    store.start_trial(study, 1, {}, worker="b")
    store.start_trial(study, 2, {}, worker="a")
    finish(store, study, 2)
    store.start_trial(study, 3, {}, worker="b")
    store.start_trial(study + "-other", 0, {})

    assert store.fail_running(study, "driver restarted", worker="b") == [1, 3]
    assert store.fail_running(study, "driver\nrestarted") == [0]
    assert store.fail_running(study, "again") == []
    assert [t.status for t in store.trials(study)] == ["failed", "failed", "complete", "failed"]
    assert store.trial(study, 0).failure == "driver restarted"
    assert store.trial(study + "-other", 0).status == "running"


# ------------------------------------------------------------------------ scores


def test_scores_round_trip_and_rescoring_replaces(store, study):
    store.record_scores(
        study,
        2,
        "search",
        {
            "arc_easy": {"acc": np.float64(0.625), "acc_norm": 0.5},
            "wikitext": {"word_perplexity": float("nan")},
        },
    )
    store.record_scores(study, 0, "search", {"arc_easy": {"acc": 0.25}})
    store.record_scores(study, 2, "selection", {"arc_easy": {"acc": 0.75}})
    store.record_scores(study, 2, "search", {"arc_easy": {"acc": 0.875}})  # re-scored
    store.record_scores(study, 1, "search", {})  # nothing to write

    search = store.scores(study, "search")
    assert list(search) == [0, 2]
    assert search[0] == {"arc_easy": {"acc": 0.25}}
    assert search[2]["arc_easy"] == {"acc": 0.875, "acc_norm": 0.5}
    assert math.isnan(search[2]["wikitext"]["word_perplexity"])
    assert store.scores(study, "selection") == {2: {"arc_easy": {"acc": 0.75}}}
    assert store.scores("no-such-study", "search") == {}
    with pytest.raises(ValueError, match="use one of search, selection"):
        store.record_scores(study, 0, "test", {"a": {"b": 1.0}})
    with pytest.raises(ValueError, match="is not a number"):
        store.record_scores(study, 0, "search", {"arc_easy": {"alias": "arc_easy"}})


def test_finish_trial_writes_its_search_scores_in_the_same_transaction(store, study):
    store.start_trial(study, 4, {"t": 0.5})
    common = dict(
        values=[0.5], plan_yaml="x: 1\n", merge_seconds=1.0, eval_seconds=2.0, device="cpu", weights_hash="cd" * 32
    )
    with pytest.raises(ValueError, match="is not a number"):  # a bad score: nothing is written
        store.finish_trial(study, 4, scores={"arc_easy": {"acc": 0.5, "alias": "arc_easy"}}, **common)
    assert store.trial(study, 4).status == "running" and store.scores(study, "search") == {}
    store.finish_trial(
        study, 4, scores={"arc_easy": {"acc": np.float64(0.625)}, "wikitext": {"ppl": float("nan")}}, **common
    )
    assert store.trial(study, 4).status == "complete" and store.trial(study, 4).values == [0.5]
    search = store.scores(study, "search")
    assert search[4]["arc_easy"] == {"acc": 0.625} and math.isnan(search[4]["wikitext"]["ppl"])
    assert store.scores(study, "selection") == {}


def test_references_round_trip(store, study):
    store.record_reference(study, "base", "/models/base", "search", {"arc_easy": {"acc": 0.25}})
    store.record_reference(
        study, "math", "/models/math", "search", {"arc_easy": {"acc": 0.5}, "gsm8k": {"exact_match": float("nan")}}
    )
    store.record_reference(study, "math", "/models/math-v2", "selection", {"arc_easy": {"acc": 0.375}})
    store.record_reference(study, "base", "/models/base", "search", {"arc_easy": {"acc": 0.3}})

    search = store.references(study, "search")
    assert list(search) == ["base", "math"]
    assert search["base"] == {"arc_easy": {"acc": 0.3}}
    assert search["math"]["arc_easy"] == {"acc": 0.5}
    assert math.isnan(search["math"]["gsm8k"]["exact_match"])
    assert store.references(study, "selection") == {"math": {"arc_easy": {"acc": 0.375}}}
    assert store.reference_paths(study) == {"base": "/models/base", "math": "/models/math-v2"}
    assert store.reference_paths("no-such-study") == {}


# --------------------------------------------------------------- the database


def test_reopening_is_idempotent_and_tables_are_prefixed(url, study):
    with TrialStore(url) as first:
        first.start_trial(study, 0, {"t": 1})
        assert first.url == url
        password = make_url(url).password
        assert password is None or password not in repr(first)
    with TrialStore(url) as second:  # create_all again: nothing lost, nothing fails
        assert second.trial(study, 0).genome == {"t": 1}
    engine = create_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert tables >= OUR_TABLES


def test_trial_survives_sigkill_right_after_finish(url, study):
    killed = run_child(
        """
        import os, signal, sys
        from evomerge.store import TrialStore
        store = TrialStore(sys.argv[1])
        store.start_trial(sys.argv[2], 7, {"t": 0.5}, worker="doomed")
        store.record_scores(sys.argv[2], 7, "search", {"arc_easy": {"acc": 0.5}})
        store.finish_trial(sys.argv[2], 7, values=[0.5], plan_yaml="p", merge_seconds=1.0,
                           eval_seconds=2.0, device="cpu", weights_hash="ff")
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit, no flush
        """,
        url,
        study,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()
    with TrialStore(url) as reopened:
        trial = reopened.trial(study, 7)
        assert (trial.status, trial.values, trial.weights_hash) == ("complete", [0.5], "ff")
        assert reopened.scores(study, "search") == {7: {"arc_easy": {"acc": 0.5}}}


def test_concurrent_writers_lose_nothing(url, study, tmp_path):
    go = tmp_path / "go"
    writer = """
        import pathlib, sys, time
        from evomerge.store import TrialStore
        url, study, worker, first, go = sys.argv[1:]
        while not pathlib.Path(go).exists():
            time.sleep(0.005)
        store = TrialStore(url)  # both create the tables at once on a fresh database
        for number in range(int(first), int(first) + 50):
            store.start_trial(study, number, {"n": number}, worker=worker)
            if number % 10 == 0:  # every write is one fsync'd commit: keep the test quick
                store.record_scores(study, number, "search", {"task": {"acc": number / 100}})
            store.finish_trial(study, number, values=[number / 100], plan_yaml=f"n: {number}",
                               merge_seconds=0.1, eval_seconds=0.2, device="cpu",
                               weights_hash=f"{number:x}")
        """
    writers = [run_child(writer, url, study, f"w{i}", str(50 * i), str(go), wait=False) for i in range(2)]
    go.touch()
    for process in writers:
        assert process.wait(timeout=60) == 0, process.stderr.read()

    with TrialStore(url) as store:
        trials = store.trials(study, status="complete")
        assert [t.number for t in trials] == list(range(100))
        assert all(t.values == [t.number / 100] and t.genome == {"n": t.number} for t in trials)
        assert {t.worker for t in trials[:50]} == {"w0"}
        assert {t.worker for t in trials[50:]} == {"w1"}
        scores = store.scores(study, "search")
        assert sorted(scores) == list(range(0, 100, 10))
        assert all(scores[n] == {"task": {"acc": n / 100}} for n in scores)


def test_coexists_with_an_optuna_study(url, study):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine = create_engine(url)
    try:
        optuna_study = optuna.create_study(storage=url, study_name=study, directions=["maximize", "minimize"])
        optuna_tables = set(inspect(engine).get_table_names()) - OUR_TABLES
        with TrialStore(url) as store:
            trial = optuna_study.ask()
            t = trial.suggest_float("t", 0.0, 1.0)
            store.start_trial(study, trial.number, trial.params, worker="main")
            optuna_study.tell(trial, [t, 1 - t])
            finish(store, study, trial.number, values=[t, 1 - t])

            reloaded = optuna.load_study(study_name=study, storage=url)
            assert [ft.values for ft in reloaded.trials] == [[t, 1 - t]]
            assert store.trial(study, trial.number).genome == {"t": t}
            assert store.trial(study, trial.number).values == [t, 1 - t]
        # Ours were added; optuna's are all still there and none of ours lacks the prefix.
        tables = set(inspect(engine).get_table_names())
        assert optuna_tables <= tables and tables >= OUR_TABLES
        assert all(name.startswith("evomerge_") for name in tables - optuna_tables)
    finally:
        engine.dispose()


def test_display_url_hides_passwords():
    from evomerge.store import display_url

    assert (
        display_url("postgresql+psycopg://evo:s3cret@db.internal:5432/runs")
        == "postgresql+psycopg://evo:***@db.internal:5432/runs"
    )
    assert display_url("sqlite:////tmp/demo.db") == "sqlite:////tmp/demo.db"
