"""Study data safety without a search: storage errors, read-only opening, the driver lease, study
uids, and `evomerge studies` (the real console script on real database files).

Runs on SQLite files; with EVOMERGE_TEST_POSTGRES_URL set, the store-level tests run on
PostgreSQL too (study names are unique per test, so a shared database works).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import optuna
import pytest
from sqlalchemy import create_engine, inspect

from evomerge.store import StorageError, TrialStore, check_storage
from evomerge.store.lease import LeaseLostError, StudyBusyError, StudyLease, live_holder
from evomerge.store.tables import leases_table

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
def study() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def evomerge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real console script (falls back to `python -m evomerge.cli` outside a venv)."""
    script = Path(sys.executable).with_name("evomerge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "evomerge.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def in_process_error(capsys, *argv: str) -> str:
    """The one-line error (exit status 2) the console script gives, from `main` in this process
    (its start-up is proved by the subprocess tests here; this spares ~2 s a command)."""
    from cli_in_process import captured

    return one_line_error(captured(capsys, *argv))


def never_serve(monkeypatch) -> None:
    """An in-process `dashboard` that missed the mistake fails the test instead of serving forever."""
    import optuna_dashboard

    def serve(*args, **kwargs):
        pytest.fail("the dashboard started serving a storage it should have refused")

    monkeypatch.setattr(optuna_dashboard, "run_server", serve)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], err[-3000:])
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def age(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def put_lease(store: TrialStore, study: str, *, host: str, pid: int, heartbeat_age: float) -> None:
    store.write(
        lambda conn: conn.execute(
            leases_table.insert().values(
                study=study,
                driver=uuid.uuid4().hex,
                host=host,
                pid=pid,
                acquired_at=age(3600),
                heartbeat_at=age(heartbeat_age),
            )
        )
    )


# ------------------------------------------------------------------ storage errors


@pytest.mark.parametrize(
    "storage, expected",
    [
        ("not a url at all", "not a database URL"),
        ("sqlit:///x.db", "unknown database kind 'sqlit'"),
        ("mysql+nosuchdriver://u@127.0.0.1/x", "unknown database kind"),
        ("mysql://u@127.0.0.1/x", "driver 'MySQLdb' is not installed"),
        ("postgresql+psycopg://u@127.0.0.1:1/x", "cannot connect to the database server"),
        (
            "sqlite:////no/such/folder/x.db",
            "the folder /no/such/folder does not exist|no database file at /no/such/folder",
        ),
        ("GARBAGE_FILE", "the file is not a SQLite database"),
        ("FOLDER", "is a folder"),
        ("TRUNCATED", "the SQLite file is damaged"),
        ("OTHER_LAYOUT", "tables have another layout"),
    ],
)
def test_bad_storage_is_one_line_for_every_command(tmp_path, storage, expected, capsys, monkeypatch):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is a spreadsheet, not a database\n" * 200)
    if storage == "TRUNCATED":  # a study database cut short (a full disk, a partial copy)
        whole = tmp_path / "whole.db"
        optuna.create_study(study_name="s", storage=f"sqlite:///{whole}").optimize(
            lambda t: t.suggest_float("x", 0, 1), n_trials=3
        )
        (tmp_path / "cut.db").write_bytes(whole.read_bytes()[:3000])
        whole.unlink()
        storage = f"sqlite:///{tmp_path / 'cut.db'}"
    if storage == "OTHER_LAYOUT":  # tables named like ours, written by something else
        with sqlite3.connect(tmp_path / "other.db") as connection:
            connection.execute("CREATE TABLE evomerge_trials (x)")
            connection.execute("CREATE TABLE evomerge_studies (y)")
        storage = f"sqlite:///{tmp_path / 'other.db'}"
    storage = storage.replace("GARBAGE_FILE", f"sqlite:///{garbage}").replace("FOLDER", f"sqlite:///{tmp_path}")
    before = sorted(p.name for p in tmp_path.iterdir())
    opens = "damaged" in expected or "layout" in expected  # those open fine; their reads fail
    if not opens:
        with pytest.raises(StorageError, match=expected):
            check_storage(storage)
    monkeypatch.chdir(tmp_path)  # relative database paths resolve here, as with the console script's cwd
    for command in (["front", "s", "--storage", storage], ["studies", storage]):
        err = in_process_error(capsys, *command)
        assert re.search(expected, err), err
    dashboard = ["dashboard", "s", "--storage", storage, "--port", str(free_port())]
    if opens:  # found only once optuna-dashboard reads the file: the real command, in a process
        err = one_line_error(evomerge(*dashboard, cwd=tmp_path))
    else:  # refused before serving: in this process, where serving would fail the test
        never_serve(monkeypatch)
        err = in_process_error(capsys, *dashboard)
    assert re.search(expected, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert garbage.read_bytes() == b"this is a spreadsheet, not a database\n" * 200


def test_check_storage_accepts_a_new_file_and_an_existing_study(tmp_path):
    assert "new SQLite database" in check_storage(f"sqlite:///{tmp_path / 'new.db'}")
    assert not (tmp_path / "new.db").exists()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=url)
    assert "existing study database" in check_storage(url)
    with pytest.raises(StorageError, match="no database file"):
        check_storage(f"sqlite:///{tmp_path / 'new.db'}", must_exist=True)


# -------------------------------------------------------------- read-only opening


def test_reading_a_missing_database_creates_nothing(tmp_path, capsys, monkeypatch):
    path = tmp_path / "missing.db"
    store = TrialStore(f"sqlite:///{path}")
    assert store.study_info("s") is None and store.trials("s") == [] and store.studies() == []
    assert store.scores("s", "search") == {} and store.references("s", "search") == {}
    assert not path.exists()
    err = in_process_error(capsys, "front", "s", "--storage", f"sqlite:///{path}")
    assert "no database file" in err and not path.exists()
    never_serve(monkeypatch)
    err = in_process_error(capsys, "dashboard", "s", "--storage", f"sqlite:///{path}", "--port", str(free_port()))
    assert "no database file" in err and not path.exists()


def test_reading_writes_nothing_to_an_optuna_only_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="plain", storage=url)
    before = (tmp_path / "optuna.db").read_bytes()
    store = TrialStore(url)
    assert store.study_info("plain") is None and store.trials("plain") == []
    assert set(store.optuna_studies()) == {"plain"}
    store.close()
    engine = create_engine(url)
    assert not [t for t in inspect(engine).get_table_names() if t.startswith("evomerge_")]
    engine.dispose()
    assert (tmp_path / "optuna.db").read_bytes() == before


def test_a_database_from_before_study_uids_opens_and_is_migrated(tmp_path):
    """Rows written without the study_uid column: read as they are, the column added on a write."""
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    with TrialStore(url) as store:
        store.save_study(
            "s",
            space_yaml="x: 1\n",
            space_path="",
            directions=["maximize"],
            objective_names=["a"],
            objective_weights=[1.0],
        )
    with sqlite3.connect(path) as connection:  # what an older evomerge wrote
        connection.execute("ALTER TABLE evomerge_studies DROP COLUMN study_uid")
        connection.execute("DROP TABLE evomerge_leases")
    with TrialStore(url) as store:
        info = store.study_info("s")
        assert info.uid is None and info.objective_names == ["a"]
    with sqlite3.connect(path) as connection:
        assert "study_uid" not in {row[1] for row in connection.execute("PRAGMA table_info(evomerge_studies)")}
    with TrialStore(url) as store:
        store.save_study(
            "s",
            space_yaml="x: 1\n",
            space_path="",
            directions=["maximize"],
            objective_names=["a"],
            objective_weights=[1.0],
            uid="u1",
        )
        assert store.study_info("s").uid == "u1"
        StudyLease(store, "s").acquire()  # the lease table was created too


# -------------------------------------------------------------------------- lease


def test_a_second_driver_is_refused_while_the_first_is_alive(url, study):
    with TrialStore(url) as store, StudyLease(store, study, heartbeat_seconds=0.1) as first:
        second = StudyLease(TrialStore(url), study)
        with pytest.raises(StudyBusyError, match=rf"being run by another driver \(pid {os.getpid()} on host"):
            second.acquire()
        assert live_holder(store, study).driver == first.driver
        first.check()  # still ours
    with TrialStore(url) as store:
        assert live_holder(store, study) is None  # released on exit
        StudyLease(store, study).acquire()


def test_a_dead_driver_on_this_host_frees_the_lease_at_once(url, study):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with TrialStore(url) as store:
        put_lease(store, study, host=StudyLease(store, study).host, pid=dead.pid, heartbeat_age=0)
        lease = StudyLease(store, study)
        lease.acquire()
        assert lease.taken_over is not None and lease.taken_over.pid == dead.pid


def test_a_driver_on_another_host_holds_until_its_heartbeat_is_stale(url, study):
    with TrialStore(url) as store:
        put_lease(store, study, host="elsewhere.example", pid=1, heartbeat_age=5)
        with pytest.raises(StudyBusyError, match="pid 1 on host elsewhere.example"):
            StudyLease(store, study).acquire()
        other = f"{study}-stale"
        put_lease(store, other, host="elsewhere.example", pid=1, heartbeat_age=120)
        lease = StudyLease(store, other, stale_seconds=60)
        lease.acquire()
        assert lease.taken_over.host == "elsewhere.example"


def test_a_driver_whose_lease_was_taken_over_notices_and_stops(url, study):
    with TrialStore(url) as store:
        with StudyLease(store, study, heartbeat_seconds=0.05) as lease:
            store.write(
                lambda conn: conn.execute(
                    leases_table.update().where(leases_table.c.study == study).values(driver="someone-else")
                )
            )
            for _ in range(100):
                if lease.lost:
                    break
                import time

                time.sleep(0.05)
            with pytest.raises(LeaseLostError, match="taken over by another driver"):
                lease.check()
        # the lost lease was not released: the other driver keeps it
        assert StudyLease(store, study).holder().driver == "someone-else"


# ----------------------------------------------------------- `evomerge studies`


def test_studies_lists_deletes_and_renames_both_sides(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    for name in ("keep", "drop"):
        optuna_study = optuna.create_study(study_name=name, storage=url)
        optuna_study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        with TrialStore(url) as store:
            store.save_study(
                name,
                space_yaml="",
                space_path="",
                directions=["maximize"],
                objective_names=["x"],
                objective_weights=[1.0],
                uid=None,
            )
            for number in range(2):
                store.start_trial(name, number, {"x": 0.5})
            store.record_capped(name, 1, items=40, of=400)
    optuna.create_study(study_name="plain", storage=url)
    listing = evomerge("studies", url)
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[1]: line for line in listing.stdout.splitlines() if line.startswith("│")}
    assert set(lines) == {"keep", "drop", "plain"}
    assert "2 complete" in lines["drop"] and "2 running" in lines["drop"] and "ok" in lines["drop"]
    assert "optuna only" in lines["plain"]

    assert "pass --yes" in in_process_error(capsys, "studies", url, "--delete", "drop")
    deleted = evomerge("studies", url, "--delete", "drop", "--yes")
    assert deleted.returncode == 0 and "deleted study 'drop' (2 optuna trials, 2 evomerge trial rows)" in deleted.stdout
    with TrialStore(url) as store:
        assert set(store.optuna_studies()) == {"keep", "plain"} and store.studies() == ["keep"]
        assert store.capped("drop") == {} and store.capped("keep") == {1: (40, 400)}
    assert "no study named 'drop'" in in_process_error(capsys, "studies", url, "--delete", "drop", "--yes")

    assert "already exists" in in_process_error(capsys, "studies", url, "--rename", "keep", "plain")
    renamed = evomerge("studies", url, "--rename", "keep", "kept")
    assert renamed.returncode == 0, renamed.stderr
    with TrialStore(url) as store:
        assert store.studies() == ["kept"] and [t.number for t in store.trials("kept")] == [0, 1]
        assert set(store.optuna_studies()) == {"kept", "plain"}
    assert len(optuna.load_study(study_name="kept", storage=url).trials) == 2

    copied = evomerge("studies", url, "--copy", "kept", "copy")
    assert copied.returncode == 0, copied.stderr
    with TrialStore(url) as store:
        assert store.studies() == ["copy", "kept"]
        assert store.capped("copy") == store.capped("kept") == {1: (40, 400)}
        assert [(t.number, t.genome) for t in store.trials("copy")] == [
            (t.number, t.genome) for t in store.trials("kept")
        ]
        studies = store.optuna_studies()
        assert store.study_info("copy").uid == studies["copy"].uid != studies["kept"].uid
    assert [t.params for t in optuna.load_study(study_name="copy", storage=url).trials] == [
        t.params for t in optuna.load_study(study_name="kept", storage=url).trials
    ]
    assert "already exists" in in_process_error(capsys, "studies", url, "--copy", "kept", "copy")


def test_studies_refuses_to_delete_a_study_a_driver_is_running(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="busy", storage=url)
    with TrialStore(url) as store, StudyLease(store, "busy", heartbeat_seconds=0.2):
        err = one_line_error(evomerge("studies", url, "--delete", "busy", "--yes"))
        assert "is being run by pid" in err
        assert "running: pid" in evomerge("studies", url).stdout
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["busy"]


def test_read_commands_refuse_rows_of_a_study_deleted_with_optuna(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna_study = optuna.create_study(study_name="s", storage=url)
    optuna_study._storage.set_study_system_attr(optuna_study._study_id, "evomerge_study_uid", "u-old")
    with TrialStore(url) as store:
        store.save_study(
            "s",
            space_yaml="models: []\n",
            space_path="",
            directions=["minimize"],
            objective_names=["x"],
            objective_weights=[1.0],
            uid="u-old",
        )
    optuna.delete_study(study_name="s", storage=url)
    assert "was deleted from optuna" in in_process_error(capsys, "front", "s", "--storage", url)
    optuna.create_study(study_name="s", storage=url)  # a new study under the same name
    assert "rows under that name are from an earlier study" in in_process_error(capsys, "front", "s", "--storage", url)
    listing = evomerge("studies", url).stdout
    assert "deleted namesake" in listing


def test_rows_belong_to_the_study_with_the_same_uid_or_the_same_trials():
    from evomerge.search.study_setup import rows_belong

    assert rows_belong("a", "a", [0, 1], [0, 1])
    assert not rows_belong("a", "b", [0, 1], [0, 1, 2])
    assert rows_belong(None, "b", [0, 1], [0, 1, 2])  # written before uids: same trials, kept
    assert not rows_belong(None, "b", [0, 1, 2], [])  # a study created again after a delete
    assert not rows_belong(None, "b", [0, 5], [0, 1])
    assert rows_belong(None, "b", [], [])


def test_a_database_file_where_a_space_file_or_url_was_expected(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=url)
    listing = evomerge("studies", str(tmp_path / "study.db"))  # the file itself is accepted there
    assert listing.returncode == 0 and "│ s " in listing.stdout, listing.stderr
    for command in (
        ["front", str(tmp_path / "study.db")],
        ["export", str(tmp_path / "study.db"), str(tmp_path / "out")],
    ):
        err = in_process_error(capsys, *command)
        assert "is a study database, not a space file" in err and f"--storage {url}" in err, err
    assert not (tmp_path / "out").exists()
