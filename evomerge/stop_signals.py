"""SIGTERM stops a command the way Ctrl-C does, so `docker stop`, Slurm and Kubernetes leave the
trial store clean: the trials in flight are failed and queued again, the study's lease is
released, a partial export is removed. A second SIGTERM kills at once, as usual.

The handler is installed by the CLI only (a library must not take over its caller's signals),
and only where SIGTERM has its default action: a parent that chose to ignore it is obeyed.

A stop never lands inside a database transaction. Raised there, it can leave a connection of
this process holding SQLite's write lock, and the cleanup that follows (failing the trial,
releasing the lease) then waits for that lock forever. While the main thread holds a database
connection (the engines count it: `watch_connections`), the handler only notes the signal, and
sends it again once the connection is back in its pool; a second signal acts at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """The process was asked to stop by a signal (not an error: `except Exception` lets it pass)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated ({signal.Signals(signum).name})")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by that signal


def exit_stopped(error: Terminated) -> None:
    """End a process that a signal asked to stop, now. Its cleanup ran while Terminated unwound the
    stack; what is left (a server's or a library's non-daemon threads, interpreter teardown) must
    not keep it alive, as SIGTERM's default action would not have."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(error.exit_status)


def stop_reason(error: BaseException) -> str | None:
    """How a deliberate stop reads in a trial's failure, or None for any other error."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(error, Terminated):
        return str(error)
    return None


class _Connections:
    """How many database connections the main thread holds, and a stop noted meanwhile."""

    held = 0
    deferred: int | None = None  # the signal number that arrived while a connection was held


def watch_connections(engine: object) -> None:
    """Count `engine`'s connections checked out by the main thread (see the module doc)."""
    from sqlalchemy import event

    def checkout(*_: object) -> None:
        if threading.current_thread() is threading.main_thread():
            _Connections.held += 1

    def checkin(*_: object) -> None:
        if threading.current_thread() is not threading.main_thread() or _Connections.held == 0:
            return
        _Connections.held -= 1
        if _Connections.held == 0 and _Connections.deferred is not None:
            signum, _Connections.deferred = _Connections.deferred, None
            # Not raised here, inside the pool's checkin: sent again, it lands at the main
            # thread's next step, after SQLAlchemy has put the connection back.
            threading.Thread(target=os.kill, args=(os.getpid(), signum), daemon=True).start()

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)


def _deferred(signum: int) -> bool:
    """Whether to note this signal for later (a connection is held and it is the first one)."""
    if _Connections.held > 0 and _Connections.deferred is None:
        _Connections.deferred = signum
        return True
    return False


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated and Ctrl-C KeyboardInterrupt in the main thread,
    never inside a database transaction (once; the next SIGTERM kills, the next Ctrl-C interrupts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    own_term = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    own_int = signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def terminate(signum: int, frame: object) -> None:
        if _deferred(signum):
            return
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated(signum)

    def interrupt(signum: int, frame: object) -> None:
        if _deferred(signum):
            return
        raise KeyboardInterrupt

    if own_term:
        signal.signal(signal.SIGTERM, terminate)
    if own_int:
        signal.signal(signal.SIGINT, interrupt)
    _Connections.deferred = None
    try:
        yield
    finally:
        _Connections.deferred = None
        if own_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if own_int:
            signal.signal(signal.SIGINT, signal.default_int_handler)
