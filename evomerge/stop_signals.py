"""SIGTERM stops a command the way Ctrl-C does, so `docker stop`, Slurm and Kubernetes leave the
trial store clean: the trials in flight are failed and queued again, the study's lease is
released, a partial export is removed. A second SIGTERM kills at once, as usual.

The handler is installed by the CLI only (a library must not take over its caller's signals),
and only where SIGTERM has its default action: a parent that chose to ignore it is obeyed.
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


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (once; the next one kills)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
