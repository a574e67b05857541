"""A stop signal never lands inside a database transaction (evomerge/stop_signals.py): while the
main thread holds a connection it is noted, and it acts once the connection is back in its pool."""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import text

from evomerge.stop_signals import Terminated, stop_on_sigterm
from evomerge.store.database import make_engine


def wait_for_signal(seconds: float = 5.0) -> None:
    """Run Python steps until a pending signal's handler raises (or the time is up)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def default_handlers():
    """The actions a terminal gives a command (a background job starts with SIGINT ignored, and
    stop_on_sigterm rightly leaves an ignored signal alone); the runner's own put back after."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'signals.db'}")
    yield engine
    engine.dispose()


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_stop_inside_a_transaction_waits_for_its_end(engine, signum, raised):
    steps = []
    with pytest.raises(raised), stop_on_sigterm():
        with engine.begin() as conn:
            conn.execute(text("create table t (x int)"))
            os.kill(os.getpid(), signum)
            for _ in range(20):  # many Python steps: an undeferred handler would have raised here
                conn.execute(text("insert into t values (1)"))
                time.sleep(0.01)
            steps.append("committed")
        wait_for_signal()
    assert steps == ["committed"]
    with engine.connect() as conn:  # the transaction committed and released the lock
        assert conn.execute(text("select count(*) from t")).scalar() == 20
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_stop_acts_at_once(engine):
    with pytest.raises(KeyboardInterrupt), stop_on_sigterm():
        with engine.connect():
            os.kill(os.getpid(), signal.SIGINT)  # noted
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # acts
            wait_for_signal()
            pytest.fail("the second Ctrl-C did not interrupt")


def test_outside_a_transaction_a_stop_acts_at_once():
    with pytest.raises(Terminated), stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_signal()
