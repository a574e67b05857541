"""The search service end to end on the demo family: run, resume, kill, export, failures, bad files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.config.space import load_space
from evomerge.store.trial_store import TrialStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def write_space(tmp_path: Path, family, *, n_trials=6, sampler="tpe", limit=25, name="space.yml", **search) -> Path:
    data = {
        "models": [f"{skill}@{path}" for skill, path in family.finetunes.items()],
        "base_model": f"base@{family.base}",
        "dtype": "float32",
        "device": "cpu",
        "genome": {
            "layer_granularity": 2,
            "methods": ["task_arithmetic", "ties"],
            "lambda": [0.5, 2.0],
            "density": [0.3, 1.0],
        },
        "objectives": [
            {"task": f"demo_{s}", "metric": "acc,none", "selection_task": f"demo_{s}_select", "name": s}
            for s in family.skills
        ],
        "eval": {"include_paths": [str(REPO / "tasks")], "limit": limit, "selection_limit": limit, "batch_size": 64},
        "search": {"sampler": sampler, "seed": 0, "n_trials": n_trials, "study_name": "e2e", "finalists": 2, **search},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(argv) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_run_resume_export_rescore(tmp_path, demo_family, capsys, monkeypatch):
    space_file = write_space(tmp_path, demo_family, n_trials=6)
    assert run_cli(["run", str(space_file), "-q"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of e2e" in out and "evomerge export" in out
    space = load_space(space_file)
    store = TrialStore(space.storage_url)
    trials = store.trials("e2e")
    assert len(trials) == 6 and all(t.status == "complete" for t in trials)
    assert {t.genome.get("g0.method") for t in trials} <= {"task_arithmetic", "ties"}
    # the enqueued seeds came first: each parent alone reproduces the parent's own scores
    references = store.references("e2e", "search")
    assert set(references) == {"base", *demo_family.skills}
    search_scores = store.scores("e2e", "search")
    first_parent = demo_family.skills[0]
    assert search_scores[0][f"demo_{first_parent}"]["acc,none"] == pytest.approx(
        references[first_parent][f"demo_{first_parent}"]["acc,none"]
    )
    assert store.scores("e2e", "selection")  # finalists were re-scored on held-out items
    assert all(
        t.weights_hash and t.merge_seconds is not None and t.plan_yaml.startswith("# Made by evomerge") for t in trials
    )

    # resume: the same command with a larger budget adds trials, keeps the old ones
    assert run_cli(["run", str(space_file), "-q", "--n-trials", "8"]) == 0
    assert len(store.trials("e2e", status="complete")) == 8

    # export the best trial, reload it, re-score it: the recorded scores come back
    export_dir = tmp_path / "export"
    assert run_cli(["export", str(space_file), str(export_dir), "-q"]) == 0
    assert "matches the scored model" in capsys.readouterr().out
    assert {"config.json", "mergekit_config.yml", "README.md", "tokenizer.json"} <= {
        p.name for p in export_dir.iterdir()
    }
    number = int((export_dir / "README.md").read_text().split("- trial: ")[1].split()[0])
    # the same trial exported where the fused C kernel is off (no compiler): the same weights
    from evomerge.merge import native

    monkeypatch.setenv("EVOMERGE_NATIVE", "0")
    native.reset()
    try:
        assert run_cli(["export", str(space_file), str(tmp_path / "eager"), "--trial", str(number), "-q"]) == 0
        assert "matches the scored model" in capsys.readouterr().out
    finally:
        monkeypatch.delenv("EVOMERGE_NATIVE")
        native.reset()
    from evomerge.evaluate.harness import evaluate_model_dir

    rescored = evaluate_model_dir(
        export_dir, [f"demo_{s}" for s in demo_family.skills], include_paths=[REPO / "tasks"], limit=25, batch_size=64
    )
    for skill in demo_family.skills:
        assert rescored[f"demo_{skill}"]["acc,none"] == pytest.approx(
            search_scores.get(number, store.scores("e2e", "search")[number])[f"demo_{skill}"]["acc,none"]
        )

    # front with a plot, then a trial that is not there
    assert run_cli(["front", str(space_file), "--plot", str(tmp_path / "front.png")]) == 0
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_cli(["export", str(space_file), str(tmp_path / "x"), "--trial", "999"]) == 2
    assert "has no trial 999" in capsys.readouterr().err


def test_failed_trials_do_not_stop_the_study(tmp_path, demo_family, monkeypatch):
    from evomerge.search.runner import run_search
    from evomerge.workers import candidate as worker_module

    original = worker_module.CandidateWorker.evaluate
    calls = {"n": 0}

    def flaky(self, params, split="search"):
        calls["n"] += 1
        if split == "search" and calls["n"] in (2, 4):
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, params, split)

    monkeypatch.setattr(worker_module.CandidateWorker, "evaluate", flaky)
    space = load_space(write_space(tmp_path, demo_family, n_trials=5, sampler="random", limit=10))
    summary = run_search(space, progress=False)
    store = TrialStore(space.storage_url)
    failed = store.trials("e2e", status="failed")
    assert [t.failure for t in failed] == ["RuntimeError: CUDA out of memory (simulated)"] * 2
    assert summary.n_complete == 3 and summary.n_failed == 2 and summary.front


def test_an_enqueued_genome_killed_before_its_genes_were_written_is_queued_again(tmp_path):
    """Between optuna handing out an enqueued trial (a parent, the uniform mix) and its genes
    reaching the database, the trial has no params: its genome is only in optuna's fixed params.
    SIGKILL there must not drop that reference point from the study."""
    from types import SimpleNamespace

    import optuna

    from evomerge.search.runner import recover_interrupted

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="e2e", storage=url)
    study.enqueue_trial({"weight": 0.5}, user_attrs={"seed": "uniform"})
    study.ask()  # RUNNING, no params yet: what a kill right after `ask` leaves
    drawn = study.ask()  # a sampler trial killed before its first suggest: nothing to retry
    notes = recover_interrupted(study, TrialStore(url), SimpleNamespace(study_name="e2e"))
    assert notes == [
        "trial 0: interrupted, failed and queued again",
        f"trial {drawn.number}: interrupted before its genome was drawn, failed",
    ]
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].system_attrs["fixed_params"] == {"weight": 0.5}
    assert waiting[0].user_attrs == {"retry_of": 0, "seed": "uniform"}
    record = TrialStore(url).trial("e2e", 0)
    assert record.status == "failed" and record.failure.startswith("interrupted")


def sigkill_a_run_after(space_file: Path, study: str, *, finished: int, statuses=("complete",), timeout=240.0) -> dict:
    """Start `evomerge run` in a process of its own, SIGKILL it once `finished` trials of `study` have
    one of `statuses`, and return the completed trials' records as the store held them then."""
    space = load_space(space_file)
    db = space.storage_url.removeprefix("sqlite:///")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "run", str(space_file), "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    marks = ", ".join("?" for _ in statuses)

    def count() -> int:
        if not Path(db).exists():
            return 0
        try:
            with sqlite3.connect(db, timeout=30) as connection:
                return connection.execute(
                    f"select count(*) from evomerge_trials where study=? and status in ({marks})", (study, *statuses)
                ).fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    deadline = time.monotonic() + timeout
    while count() < finished and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.3)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return {t.number: t for t in TrialStore(space.storage_url).trials(study, status="complete")}


def assert_none_lost(before: dict, store: TrialStore, study: str) -> None:
    """Every trial completed before the kill is still there, with the same weights and values."""
    after = {t.number: t for t in store.trials(study, status="complete")}
    for number, record in before.items():
        assert after[number].weights_hash == record.weights_hash and after[number].values == record.values


def test_sigkill_loses_no_completed_trial_and_resumes(tmp_path, demo_family):
    space_file = write_space(tmp_path, demo_family, n_trials=40, sampler="random", limit=10)
    space = load_space(space_file)
    before = sigkill_a_run_after(space_file, "e2e", finished=3)
    assert len(before) >= 3

    assert run_cli(["run", str(space_file), "-q", "--n-trials", str(len(before) + 3)]) == 0
    store = TrialStore(space.storage_url)
    assert_none_lost(before, store, "e2e")
    interrupted = [t for t in store.trials("e2e", status="failed") if t.failure.startswith("interrupted")]
    assert len(interrupted) <= 1
    import optuna

    study = optuna.load_study(study_name="e2e", storage=space.storage_url)
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    if interrupted:
        retried = [t for t in study.trials if t.user_attrs.get("retry_of") == interrupted[0].number]
        if interrupted[0].genome:  # the interrupted genome was queued again and ran
            assert retried and retried[0].state.name == "COMPLETE" and retried[0].params == interrupted[0].genome
        else:  # killed before its first gene was drawn: nothing to retry, the sampler draws anew
            assert not retried


@pytest.mark.parametrize(
    "change, field, message",
    [
        (lambda d: d["search"].update(sampler="cmaess"), "search.sampler", "did you mean 'cmaes'"),
        (lambda d: d["genome"].update(density=[0.9, 0.2]), "genome.density", "expected low < high"),
        (lambda d: d["genome"].update(methods=["tie"]), "genome.methods", "did you mean 'ties'"),
        (lambda d: d.update(models=["x@/no/such/model"]), "models.0", "does not exist"),
        (lambda d: d.update(objectives=[]), "objectives", "at least one objective"),
        (lambda d: d["search"].pop("n_trials"), "search", "set n_trials and/or timeout"),
        (lambda d: d["genome"].update(layer_granularity=3), "genome.layer_granularity", "does not divide"),
        (lambda d: d.update(dtyp="float32"), "dtyp", "unknown field"),
    ],
)
def test_bad_space_files_are_one_line_errors(tmp_path, demo_family, capsys, change, field, message):
    path = write_space(tmp_path, demo_family)
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    assert run_cli(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert f"{field}:" in err and message in err, err


def test_dashboard_serves_the_study_on_loopback(tmp_path):
    """`evomerge dashboard` over a study database: optuna-dashboard answers on 127.0.0.1 only."""
    import json
    import socket
    import urllib.request

    import optuna

    url = f"sqlite:///{tmp_path / 'dash.db'}"
    optuna.create_study(study_name="dash-study", storage=url).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "dashboard", "dash-study", "--storage", url, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/studies", headers={"Accept-Encoding": "identity"}
                )
                with urllib.request.urlopen(request, timeout=2) as response:
                    body = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.3)
        assert body is not None, process.stdout.read().decode()[-1000:] if process.poll() is not None else "no answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["dash-study"]
        listening = [c for c in __import__("psutil").Process(process.pid).net_connections() if c.status == "LISTEN"]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
