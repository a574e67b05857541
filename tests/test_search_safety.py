"""Study data safety in real searches on the demo family: one driver per study, studies deleted
with optuna's tools, space files edited under a study, and failures outside a trial.

After every case the trial store and optuna agree on every trial, and n_trials holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from test_search_e2e import run_cli, write_space

from evomerge.config.space import load_space
from evomerge.errors import EvomergeError
from evomerge.search.loop import finished_count
from evomerge.store.trial_store import TrialStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STATES = {"COMPLETE": "complete", "FAIL": "failed", "RUNNING": "running"}


def assert_store_agrees_with_optuna(space, *, n_complete: int | None = None) -> list:
    """Every optuna trial that started has a store row in the same state; none is left RUNNING
    or WAITING; the store has no trial optuna does not."""
    study = optuna.load_study(study_name=space.study_name, storage=space.storage_url)
    trials = study.get_trials(deepcopy=False)
    records = {r.number: r for r in TrialStore(space.storage_url).trials(space.study_name)}
    assert not [t.number for t in trials if t.state.name in ("RUNNING", "WAITING")], [
        (t.number, t.state.name) for t in trials
    ]
    assert set(records) == {t.number for t in trials}
    for trial in trials:
        assert records[trial.number].status == STATES[trial.state.name], (
            trial.number,
            trial.state,
            records[trial.number],
        )
        if trial.state.name == "COMPLETE":
            assert records[trial.number].values == pytest.approx(trial.values)
    if n_complete is not None:
        assert sum(t.state.name == "COMPLETE" for t in trials) == n_complete
    return trials


# A job started in the background of a non-interactive shell (as a CI runner may start the suite)
# inherits SIGINT ignored, and Python then keeps ignoring it: give the driver the default action,
# as a terminal's foreground job has.
WITH_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def evomerge(*args: str) -> subprocess.Popen:
    script = Path(sys.executable).with_name("evomerge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "evomerge.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    launcher = [sys.executable, "-c", WITH_DEFAULT_SIGINT, command[0] if script.exists() else sys.executable]
    return subprocess.Popen(
        [*launcher, *command[1:], *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a run gets as far as loading models."""
    from evomerge.workers import pool

    def refuse(*args, **kwargs):
        raise AssertionError("models were loaded before the mistake was found")

    monkeypatch.setattr(pool, "make_pool", refuse)


def test_two_concurrent_drivers_one_runs_the_other_is_refused(tmp_path, demo_family):
    space_file = write_space(tmp_path, demo_family, n_trials=5, sampler="random", limit=5, enqueue=[])
    drivers = [evomerge("run", str(space_file), "-q") for _ in range(2)]
    results = [(d.wait(timeout=600), d.stdout.read(), d.stderr.read()) for d in drivers]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2).strip()
    assert refused.startswith("error: study 'e2e'") and "\n" not in refused, refused
    assert "is being run by another driver (pid" in refused and "host" in refused
    assert_store_agrees_with_optuna(load_space(space_file), n_complete=5)


def test_a_study_deleted_with_optuna_leaves_nothing_in_its_namesake(tmp_path, demo_family, capsys):
    space_file = write_space(tmp_path, demo_family, n_trials=2, sampler="random", limit=5, enqueue=[], finalists=0)
    space = load_space(space_file)
    assert run_cli(["run", str(space_file), "-q"]) == 0
    old_hashes = {t.weights_hash for t in TrialStore(space.storage_url).trials("e2e")}
    optuna.delete_study(study_name="e2e", storage=space.storage_url)  # what the dashboard's button does
    capsys.readouterr()

    assert run_cli(["front", str(space_file)]) == 2
    assert "was deleted from optuna" in capsys.readouterr().err

    data = yaml.safe_load(space_file.read_text())
    data["search"]["seed"] = 1  # other genomes than the deleted study's
    space_file.write_text(yaml.safe_dump(data))
    assert run_cli(["run", str(space_file), "-q", "--n-trials", "1"]) == 0
    assert "removed evomerge's rows of an earlier study named 'e2e' (2 trials)" in capsys.readouterr().out
    records = TrialStore(space.storage_url).trials("e2e")
    assert [r.number for r in records] == [0] and records[0].weights_hash not in old_hashes
    assert_store_agrees_with_optuna(space, n_complete=1)
    assert run_cli(["front", str(space_file)]) == 0
    out = capsys.readouterr().out
    assert "trial 0" in out and "trial 1" not in out


@pytest.mark.parametrize(
    "edit, field, message",
    [
        (lambda d: d["genome"].update(methods=["ties", "dare_ties"]), "genome", "gene 'g0.method' as a choice of"),
        (lambda d: d["objectives"].pop(), "objectives", "was created with directions"),
        (
            lambda d: [o.update(name=f"{o['name']}-renamed") for o in d["objectives"]],
            "objectives",
            "was run with objectives",
        ),
        (lambda d: d["genome"].update(layer_granularity=1), "genome", "this space adds genes its trials lack"),
    ],
)
def test_a_space_edited_under_a_study_is_refused_before_models_load(
    tmp_path, demo_family, capsys, monkeypatch, edit, field, message
):
    space_file = write_space(tmp_path, demo_family, n_trials=1, sampler="random", limit=5, enqueue=[], finalists=0)
    assert run_cli(["run", str(space_file), "-q"]) == 0
    from evomerge.errors import ConfigError
    from evomerge.genome.parameters import ParameterGenome as Genome
    from evomerge.search.study_setup import check_space_against_database

    space = load_space(space_file)
    assert "exists (1 complete trials) and this space fits it" in check_space_against_database(space, Genome(space))
    stored = TrialStore(space.storage_url).study_info("e2e").space_yaml
    data = yaml.safe_load(space_file.read_text())
    edit(data)
    space_file.write_text(yaml.safe_dump(data))
    edited = load_space(space_file)
    with pytest.raises(ConfigError, match=message):  # what `validate` calls: the same finding, read-only
        check_space_against_database(edited, Genome(edited))
    from evomerge.workers import pool

    monkeypatch.setattr(
        pool, "make_pool", lambda *a, **k: pytest.fail("models were loaded before the mistake was found")
    )
    capsys.readouterr()
    assert run_cli(["run", str(space_file), "-q", "--n-trials", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {space_file}: {field}: study 'e2e'") and "\n" not in err, err
    assert message in err and "search.study_name" in err, err
    assert TrialStore(load_space(space_file).storage_url).study_info("e2e").space_yaml == stored  # not replaced
    # `front` and `export` read the study through the edited file: the same line there (not a
    # KeyError or a hash mismatch from export), and no output folder is made
    for command in (["front", str(space_file)], ["export", str(space_file), str(tmp_path / "out"), "-q"]):
        assert run_cli(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {space_file}: {field}: study 'e2e'") and "\n" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "storage, message",
    [
        ("GARBAGE", "the file is not a SQLite database"),
        ("sqlite:////no/such/dir/x.db", "does not exist"),
        ("sqlit:///x.db", "unknown database kind"),
    ],
)
def test_run_with_a_bad_storage_stops_before_models_load(
    tmp_path, demo_family, capsys, no_model_loading, storage, message
):
    garbage = tmp_path / "garbage.db"
    garbage.write_text("not a database\n" * 100)
    space_file = write_space(tmp_path, demo_family, n_trials=1)
    assert run_cli(["run", str(space_file), "-q", "--storage", storage.replace("GARBAGE", f"sqlite:///{garbage}")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "search.storage: storage " in err and "\n" not in err and message in err, err
    assert garbage.read_text() == "not a database\n" * 100


def test_a_parent_that_cannot_be_scored_leaves_no_trial_behind(tmp_path, demo_family, monkeypatch, capsys):
    from evomerge.workers import candidate as worker_module

    def broken(self, name, split="search"):
        raise RuntimeError("eval.max_length too small for the prompts (simulated)")

    monkeypatch.setattr(worker_module.CandidateWorker, "score_reference", broken)
    space_file = write_space(tmp_path, demo_family, n_trials=3, sampler="random", limit=5)
    assert run_cli(["run", str(space_file), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "scoring the reference model 'base' on the search tasks failed" in err and "\n" not in err, err
    trials = assert_store_agrees_with_optuna(load_space(space_file), n_complete=0)
    assert trials == []  # no seed left WAITING, nothing RUNNING


def test_a_failure_outside_a_trial_fails_and_requeues_what_was_in_flight(tmp_path, demo_family, monkeypatch):
    from evomerge.search.runner import run_search

    original = TrialStore.finish_trial
    calls = {"n": 0}

    def database_hiccup(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the disk went away (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrialStore, "finish_trial", database_hiccup)
    space = load_space(
        write_space(tmp_path, demo_family, n_trials=4, sampler="random", limit=5, enqueue=[], finalists=0)
    )
    with pytest.raises(RuntimeError, match="disk went away"):
        run_search(space, progress=False)
    study = optuna.load_study(study_name="e2e", storage=space.storage_url)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [1]
    assert (
        failed[0].user_attrs["failure"]
        == "search stopped before this trial finished: RuntimeError: the disk went away (simulated)"
    )
    record = TrialStore(space.storage_url).trial("e2e", 1)
    assert record.status == "failed" and record.failure == failed[0].user_attrs["failure"]
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    assert [t.user_attrs["retry_of"] for t in waiting] == [1] and waiting[0].system_attrs["fixed_params"] == failed[
        0
    ].params

    monkeypatch.setattr(TrialStore, "finish_trial", original)
    summary = run_search(space, progress=False)  # the retry runs first; the budget counts it once
    trials = assert_store_agrees_with_optuna(space, n_complete=4)
    assert summary.n_complete == 4 and len(trials) == 5
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.params == failed[0].params and retry.state.name == "COMPLETE"


def test_the_sigkill_resume_still_needs_no_wait(tmp_path, demo_family):
    """A lease left by a killed driver on this host does not hold the next run back."""
    from evomerge.store.lease import read_holder

    space_file = write_space(tmp_path, demo_family, n_trials=1, sampler="random", limit=5, enqueue=[], finalists=0)
    space = load_space(space_file)
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import os, signal, sys; from evomerge.store import TrialStore; from evomerge.store.lease import StudyLease;"
                "lease = StudyLease(TrialStore(sys.argv[1]), 'e2e'); lease.acquire(); os.kill(os.getpid(), signal.SIGKILL)"
            ),
            space.storage_url,
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
    )
    assert killed.returncode == -9
    assert read_holder(TrialStore(space.storage_url), "e2e") is not None
    assert run_cli(["run", str(space_file), "-q"]) == 0
    assert read_holder(TrialStore(space.storage_url), "e2e") is None  # released at the end
    assert_store_agrees_with_optuna(space, n_complete=1)


def test_a_lost_lease_stops_the_driver_without_telling_optuna(tmp_path, demo_family, monkeypatch):
    """A driver silent past the stale limit was taken over: it must not tell or fail any trial."""
    import functools

    from evomerge.search import runner
    from evomerge.search.runner import run_search
    from evomerge.store.lease import StudyLease, leases_table

    original = TrialStore.start_trial

    def taken_over(self, study, number, genome, **kwargs):
        original(self, study, number, genome, **kwargs)
        self.write(
            lambda conn: conn.execute(
                leases_table.update().where(leases_table.c.study == study).values(driver="another-driver")
            )
        )

    monkeypatch.setattr(TrialStore, "start_trial", taken_over)
    monkeypatch.setattr(runner, "StudyLease", functools.partial(StudyLease, heartbeat_seconds=0.05))
    space = load_space(
        write_space(tmp_path, demo_family, n_trials=2, sampler="random", limit=5, enqueue=[], finalists=0)
    )
    with pytest.raises(EvomergeError, match="lease was taken over by another driver"):
        run_search(space, progress=False)
    study = optuna.load_study(study_name="e2e", storage=space.storage_url)
    assert [t.state.name for t in study.trials] == ["RUNNING"]  # left to the driver that took over
    assert TrialStore(space.storage_url).trial("e2e", 0).status == "running"


@pytest.mark.parametrize(
    ("stop", "reason", "status", "last_line"),
    [
        ("SIGINT", "interrupted (Ctrl-C)", 130, "interrupted"),
        ("SIGTERM", "terminated (SIGTERM)", 143, "terminated (SIGTERM)"),
    ],
)
def test_a_stop_signal_fails_the_trial_in_flight_and_frees_the_study(
    tmp_path, demo_family, stop, reason, status, last_line
):
    """SIGINT (Ctrl-C) or SIGTERM (docker stop, Slurm) to a real driver: the trial it was running
    is failed in the store and in optuna (with the reason) and queued again; nothing stays
    RUNNING; the lease is released; the exit status is the shell's for that signal."""
    import signal
    import sqlite3
    import time

    from evomerge.store.lease import read_holder

    space_file = write_space(tmp_path, demo_family, n_trials=40, sampler="random", limit=5, enqueue=[], finalists=0)
    space = load_space(space_file)
    driver = evomerge("run", str(space_file), "-q")
    database = space.storage_url.removeprefix("sqlite:///")

    def completed() -> int:
        try:
            with sqlite3.connect(database, timeout=30) as connection:
                return connection.execute("select count(*) from evomerge_trials where status='complete'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    deadline = time.monotonic() + 300
    while completed() < 2 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.3)
    assert driver.poll() is None, driver.stderr.read()[-2000:]
    driver.send_signal(getattr(signal, stop))
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == status, stderr[-2000:]
    assert stderr.splitlines()[-1] == last_line
    study = optuna.load_study(study_name="e2e", storage=space.storage_url)
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) <= 1  # none when the signal landed between two trials
    for trial in failed:
        record = TrialStore(space.storage_url).trial("e2e", trial.number)
        assert record.status == "failed" and record.failure == f"search stopped before this trial finished: {reason}"
        waiting = [t.user_attrs["retry_of"] for t in study.trials if t.state.name == "WAITING"]
        if trial.params:
            assert waiting == [trial.number]
        else:  # the signal landed inside study.ask() (no genome: nothing to queue) or before the
            # genes were committed (the driver's genome is queued)
            assert waiting in ([], [trial.number])
        # either way the failed trial does not count against n_trials: its retry or a new draw does
        assert finished_count(study) == sum(t.state.name == "COMPLETE" for t in study.trials)
    assert read_holder(TrialStore(space.storage_url), "e2e") is None


def test_a_trial_failed_before_its_genome_was_drawn_does_not_count_against_n_trials():
    """An interrupt inside study.ask() leaves a trial with no genome: it is failed (nothing to queue
    again) but costs the user no trial of the budget; a failure with a genome still counts."""
    from optuna.trial import TrialState

    study = optuna.create_study()
    drawn = study.ask()
    drawn.suggest_float("x", 0.0, 1.0)
    study.tell(drawn, 0.5)
    study.tell(study.ask(), state=TrialState.FAIL)  # interrupted before any gene was suggested
    assert finished_count(study) == 1
    failed = study.ask()
    failed.suggest_float("x", 0.0, 1.0)
    study.tell(failed, state=TrialState.FAIL)  # a merge that failed: its genome was evaluated
    assert finished_count(study) == 2
