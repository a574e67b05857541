"""One driver per study: a lease row with a heartbeat.

A driver asks optuna for trials, runs them on its workers (Ray actors scale one driver out) and
recovers the trials a dead driver left RUNNING. A second driver on the same study would take the
first one's live trials for interrupted ones, so `run` takes the study's lease first and a second
`run` is refused with one line that says who holds it.

The holder refreshes `heartbeat_at` from a daemon thread every `heartbeat_seconds`. The lease is
free when its holder is gone: at once on the same host when its process no longer exists (so a
run after a SIGKILL resumes without waiting), on any host when the heartbeat is older than
`stale_seconds` (a machine that died, a network that split). Clocks: the holder writes and the
reader judges in UTC; a skew well under `stale_seconds` does not matter.

Every change goes through one write transaction (SQLite: BEGIN IMMEDIATE) and a take-over is a
compare-and-set on (driver, heartbeat_at), so two drivers racing for a free lease cannot both win
on any database.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import IntegrityError

from evomerge.errors import EvomergeError
from evomerge.store.database import database_errors, display_url
from evomerge.store.tables import leases_table
from evomerge.store.trial_store import TrialStore

log = logging.getLogger("evomerge.lease")

HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0


_HELD_HERE: set[str] = set()  # drivers of leases this process holds now


class StudyBusyError(EvomergeError):
    """Another live driver holds the study's lease."""


class LeaseLostError(EvomergeError):
    """This driver's lease was taken over (its heartbeat went stale): it must stop touching trials."""


@dataclass(frozen=True)
class LeaseHolder:
    study: str
    driver: str
    host: str
    pid: int
    acquired_at: datetime
    heartbeat_at: datetime

    def describe(self, now: datetime) -> str:
        since = self.acquired_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        age = max(0.0, (now - self.heartbeat_at).total_seconds())
        return f"pid {self.pid} on host {self.host}, since {since}, last heartbeat {age:.0f}s ago"


class StudyLease:
    """The lease of one study for this process; a context manager that heartbeats while held."""

    def __init__(
        self,
        store: TrialStore,
        study: str,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        stale_seconds: float = STALE_SECONDS,
    ):
        self.store = store
        self.study = study
        self.driver = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_seconds = stale_seconds
        self.taken_over: LeaseHolder | None = None  # a dead holder this driver replaced
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        """Raise LeaseLostError if another driver has taken the study over."""
        if self.lost:
            raise LeaseLostError(
                f"study '{self.study}' in {display_url(self.store.url)}: this driver's lease was taken over by "
                f"another driver after its heartbeat stopped for more than {self.stale_seconds:.0f}s; "
                "it stops here and leaves the trials to that driver"
            )

    def acquire(self) -> None:
        """Take the lease or raise StudyBusyError naming the live holder."""
        with database_errors(self.store.url):
            for _ in range(5):
                try:
                    self.taken_over = self.store._write(self._take)
                    _HELD_HERE.add(self.driver)
                    return
                # Another driver inserted the row between our read and our insert, or the holder
                # changed between our read and our compare-and-set: read again.
                except (IntegrityError, _Raced):
                    continue
        holder = self.holder()
        raise StudyBusyError(
            self._busy_message(holder) if holder else f"study '{self.study}': could not take its lease"
        )

    def holder(self) -> LeaseHolder | None:
        return read_holder(self.store, self.study)

    def refresh(self) -> bool:
        """Write a fresh heartbeat; False (and `lost` set) if the lease is no longer ours."""
        t = leases_table

        def beat(conn: Connection) -> int:
            stmt = update(t).where(t.c.study == self.study, t.c.driver == self.driver).values(heartbeat_at=_utcnow())
            return conn.execute(stmt).rowcount

        if self.store.write(beat) != 1:
            self._lost.set()
            return False
        return True

    def release(self) -> None:
        t = leases_table
        self.store.write(lambda conn: conn.execute(delete(t).where(t.c.study == self.study, t.c.driver == self.driver)))

    def __enter__(self) -> StudyLease:
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name=f"evomerge-lease-{self.study}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_seconds + 5)
        _HELD_HERE.discard(self.driver)
        if not self.lost:
            try:
                self.release()
            except Exception as error:  # the database went away: the lease goes stale on its own
                log.warning("could not release the lease of study %s: %s", self.study, error)

    # -------------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not self.refresh():
                    log.error("study %s: lease taken over by another driver; stopping", self.study)
                    return
            except Exception as error:  # a database hiccup: try again next beat
                log.warning("study %s: heartbeat failed: %s", self.study, error)

    def _take(self, conn: Connection) -> LeaseHolder | None:
        t = leases_table
        now = _utcnow()
        mine = {
            "driver": self.driver,
            "host": self.host,
            "pid": self.pid,
            "acquired_at": now,
            "heartbeat_at": now,
        }
        row = conn.execute(select(t).where(t.c.study == self.study)).mappings().first()
        if row is None:
            conn.execute(t.insert().values(study=self.study, **mine))
            return None
        holder = _holder(row)
        if holder.driver == self.driver:
            conn.execute(update(t).where(t.c.study == self.study).values(heartbeat_at=now))
            return None
        if not self.is_free(holder, now):
            raise StudyBusyError(self._busy_message(holder, now))
        swapped = conn.execute(
            update(t)
            .where(t.c.study == self.study, t.c.driver == holder.driver, t.c.heartbeat_at == row["heartbeat_at"])
            .values(**mine)
        )
        if swapped.rowcount != 1:
            raise _Raced()
        return holder

    def is_free(self, holder: LeaseHolder, now: datetime) -> bool:
        """Whether `holder` is gone: its process ended (same host) or its heartbeat is stale."""
        if holder.host == self.host:
            if holder.pid == self.pid:
                # Our own pid: a lease this process holds now is live; any other was left by an
                # earlier process that had our pid (a restarted container's pid 1), now dead.
                return holder.driver not in _HELD_HERE
            if not _process_exists(holder.pid):
                return True
        return now - holder.heartbeat_at > timedelta(seconds=self.stale_seconds)

    def _busy_message(self, holder: LeaseHolder, now: datetime | None = None) -> str:
        return (
            f"study '{self.study}' in {display_url(self.store.url)} is being run by another driver "
            f"({holder.describe(now or _utcnow())}); one driver runs a study (use search.workers for more "
            f"workers): wait for it to finish or stop it (a driver silent for {self.stale_seconds:.0f}s is "
            "taken over), or give this run another search.study_name"
        )


class _Raced(Exception):
    """The lease row changed between our read and our compare-and-set; read again."""


def read_holder(store: TrialStore, study: str) -> LeaseHolder | None:
    """The study's lease row, if any (its holder may be dead: see StudyLease.is_free)."""
    t = leases_table
    row = store._read((t,), lambda conn: conn.execute(select(t).where(t.c.study == study)).mappings().first(), None)
    return None if row is None else _holder(row)


def live_holder(store: TrialStore, study: str, *, stale_seconds: float = STALE_SECONDS) -> LeaseHolder | None:
    """The study's lease holder if it is alive (for `evomerge studies`: refuse to delete under it)."""
    holder = read_holder(store, study)
    if holder is None:
        return None
    probe = StudyLease(store, study, stale_seconds=stale_seconds)
    return None if probe.is_free(holder, _utcnow()) else holder


def _holder(row) -> LeaseHolder:
    return LeaseHolder(
        study=row["study"],
        driver=row["driver"],
        host=row["host"],
        pid=int(row["pid"]),
        acquired_at=_as_utc(row["acquired_at"]),
        heartbeat_at=_as_utc(row["heartbeat_at"]),
    )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
