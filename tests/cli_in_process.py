"""The CLI's `main` run in the test process: the exit status and output the console script gives
(its start-up is proved by the subprocess tests), without an interpreter start-up per call."""

from __future__ import annotations

import subprocess

from evomerge.cli import main


def exit_code(argv) -> int:
    """`main(argv)`'s exit status, as the shell would see it (SystemExit(None) is 0, a message 1)."""
    try:
        main([str(a) for a in argv])
    except SystemExit as stopped:
        code = stopped.code
        return 0 if code is None else code if isinstance(code, int) else 1
    return 0


def captured(capsys, *argv) -> subprocess.CompletedProcess:
    """`main(argv)` with its stdout and stderr, shaped like a subprocess run of the console script."""
    capsys.readouterr()
    code = exit_code(argv)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([str(a) for a in argv], code, out, err)
