"""The search service on PostgreSQL: run, resume, front and export with the study in PG only.

Skipped unless EVOMERGE_TEST_POSTGRES_URL names a scratch database (`postgresql+psycopg://...`);
`scripts/with-postgres.sh CMD` starts a private server and sets it (CI runs the suite that way).
The database is shared with tests/test_store.py, which runs every store test against it too
(concurrent writers included), so study names here are unique per test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from test_search_e2e import run_cli, write_space
from test_store import OUR_TABLES

REPO = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
OPTUNA_TABLES = {"studies", "trials", "trial_values", "trial_params", "alembic_version"}

pytestmark = pytest.mark.skipif(
    not POSTGRES_URL, reason="set EVOMERGE_TEST_POSTGRES_URL (or run under scripts/with-postgres.sh)"
)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.slow
def test_search_resume_front_export_on_postgres(tmp_path, demo_family, capsys, monkeypatch):
    import optuna
    from sqlalchemy.engine import make_url

    from evomerge.store.trial_store import TrialStore

    study = unique("pg-search")
    # The throwaway server trusts every local connection, so a password in the URL is ignored by
    # the server; it must never reach a terminal, a log or the exported model card either.
    secret_url = make_url(POSTGRES_URL).set(password="s3cret-pw").render_as_string(hide_password=False)
    space_file = write_space(
        tmp_path,
        demo_family,
        n_trials=4,
        sampler="random",
        limit=10,
        finalists=1,
        storage=secret_url,
        study_name=study,
    )
    assert run_cli(["run", str(space_file), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"Pareto front of {study}" in out and "s3cret-pw" not in out and ":***@" in out
    with TrialStore(POSTGRES_URL) as store:
        assert [t.status for t in store.trials(study)] == ["complete"] * 4

    # resume: the same space, a larger budget
    assert run_cli(["run", str(space_file), "-q", "--n-trials", "6"]) == 0
    capsys.readouterr()
    with TrialStore(POSTGRES_URL) as store:
        trials = store.trials(study)
        assert [t.number for t in trials] == list(range(6))
        assert all(t.status == "complete" and t.weights_hash and t.values for t in trials)
        assert set(store.scores(study, "search")) == set(range(6))
        assert store.scores(study, "selection")  # finalists were re-scored
        assert set(store.references(study, "search")) == {"base", *demo_family.skills}
        info = store.study_info(study)
        assert info is not None and info.space_yaml == space_file.read_text()

    # optuna's study and ours are both in PostgreSQL, and nothing went to a SQLite file
    loaded = optuna.load_study(study_name=study, storage=POSTGRES_URL)
    assert [t.state.name for t in loaded.trials] == ["COMPLETE"] * 6
    assert [t.number for t in loaded.trials] == list(range(6))
    assert table_names(POSTGRES_URL) >= OPTUNA_TABLES | OUR_TABLES
    assert not list(tmp_path.glob("*.db"))

    # front and export by study name + --storage: no space file needed (it is stored in the DB)
    space_file.unlink()
    monkeypatch.chdir(tmp_path)
    assert run_cli(["front", study, "--storage", POSTGRES_URL]) == 0
    out = capsys.readouterr().out
    assert f"Pareto front of {study}" in out and "Top 6 trials" in out

    export_dir = tmp_path / "export"
    assert run_cli(["export", study, str(export_dir), "--storage", secret_url, "-q"]) == 0
    assert "matches the scored model" in capsys.readouterr().out
    assert {"config.json", "mergekit_config.yml", "README.md", "tokenizer.json"} <= {
        p.name for p in export_dir.iterdir()
    }
    assert "s3cret-pw" not in (export_dir / "README.md").read_text()

    assert run_cli(["export", unique("pg-none"), str(tmp_path / "x"), "--storage", POSTGRES_URL]) == 2
    assert "no study named" in capsys.readouterr().err


@pytest.fixture
def fresh_database():
    """A new, empty database on the same server (dropped afterwards), or a skip without the right."""
    url = make_url(POSTGRES_URL)
    name = unique("evomerge_fresh").replace("-", "_")
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # e.g. a user-provided server where we may not create databases
        admin.dispose()
        pytest.skip(f"cannot create a scratch database: {error}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_concurrent_workers_on_a_fresh_database(fresh_database, tmp_path):
    """Workers that start together on an empty database: table creation races, then disjoint writes.

    tests/test_store.py covers concurrent writers once the tables exist (the shared database has
    them by then); here 4 processes open the store at the same instant on a database with no tables.
    """
    from evomerge.store.trial_store import TrialStore

    study = unique("pg-workers")
    go = tmp_path / "go"
    worker = textwrap.dedent(
        """
        import pathlib, sys, time
        from evomerge.store import TrialStore
        url, study, worker, first, go = sys.argv[1:]
        while not pathlib.Path(go).exists():
            time.sleep(0.002)
        store = TrialStore(url)
        for number in range(int(first), int(first) + 20):
            store.start_trial(study, number, {"n": number}, worker=worker)
            store.record_scores(study, number, "search", {"task": {"acc": number / 100, "f1": 1 - number / 100}})
            store.finish_trial(study, number, values=[number / 100], plan_yaml=f"n: {number}",
                               merge_seconds=0.1, eval_seconds=0.2, device="cpu",
                               weights_hash=f"{number:x}")
        store.close()
        """
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", worker, fresh_database, study, f"w{i}", str(20 * i), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    go.touch()
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]

    assert table_names(fresh_database) >= OUR_TABLES
    with TrialStore(fresh_database) as store:
        trials = store.trials(study, status="complete")
        assert [t.number for t in trials] == list(range(80))
        assert all(t.values == [t.number / 100] and t.worker == f"w{t.number // 20}" for t in trials)
        scores = store.scores(study, "search")
        assert sorted(scores) == list(range(80))
        assert all(scores[n] == {"task": {"acc": n / 100, "f1": 1 - n / 100}} for n in scores)


def test_reading_creates_nothing_and_studies_deletes_both_sides(fresh_database):
    """On a server database: `front` on an empty database creates no table; `studies --delete`
    removes optuna's study and evomerge's rows; a database from before study uids is migrated."""
    import optuna

    from evomerge.store.trial_store import TrialStore

    env = os.environ | {"PYTHONPATH": str(REPO)}

    def evomerge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, env=env, timeout=120
        )

    front = evomerge("front", "nothing", "--storage", fresh_database)
    assert front.returncode == 2 and "no study named 'nothing'" in front.stderr, front.stderr
    assert table_names(fresh_database) == set()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="s", storage=fresh_database).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2
    )
    with TrialStore(fresh_database) as store:
        store.save_study(
            "s", space_yaml="", space_path="", directions=["minimize"], objective_names=["x"], objective_weights=[1.0]
        )
        store.start_trial("s", 0, {"x": 0.5})
    engine = create_engine(fresh_database)
    with engine.begin() as conn:  # what an evomerge from before study uids wrote
        conn.execute(text("ALTER TABLE evomerge_studies DROP COLUMN study_uid"))
    engine.dispose()
    with TrialStore(fresh_database) as store:
        assert store.study_info("s").uid is None
        store.save_study(
            "s",
            space_yaml="",
            space_path="",
            directions=["minimize"],
            objective_names=["x"],
            objective_weights=[1.0],
            uid="u1",
        )
        assert store.study_info("s").uid == "u1"
    renamed = evomerge("studies", fresh_database, "--rename", "s", "t")
    assert renamed.returncode == 0, renamed.stderr
    copied = evomerge("studies", fresh_database, "--copy", "t", "u")
    assert copied.returncode == 0, copied.stderr
    for name in ("t", "u"):
        deleted = evomerge("studies", fresh_database, "--delete", name, "--yes")
        assert deleted.returncode == 0 and "(2 optuna trials, 1 evomerge trial rows)" in deleted.stdout, deleted.stderr
    with TrialStore(fresh_database) as store:
        assert store.studies() == [] and store.optuna_studies() == {}
