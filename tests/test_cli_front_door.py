"""The real `evomerge` console script on user mistakes: one `error:` line, exit 2, no traceback.

Usage errors come from the click that typer bundles; values out of range, devices this machine
lacks, an output folder under a file and a taken dashboard port are refused before any model is
read. A bug is one line too (exit 1) unless --debug asks for the traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EVOMERGE = Path(sys.executable).with_name("evomerge")


def evomerge(*argv: str, cwd: Path, script: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EVOMERGE_DEBUG": "", "COLUMNS": "100"}
    command = script or [str(EVOMERGE)]
    return subprocess.run([*command, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def error_line(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """The single `error:` line of a refused command (after at most click's usage and hint)."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and len(lines) <= 3, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    assert EVOMERGE.exists(), f"the console script is not installed beside {sys.executable}"
    root = tmp_path_factory.mktemp("front_door")
    (root / "merge.yml").write_text("merge_method: linear\nmodels: []\n")
    (root / "a_file").write_text("not a folder\n")
    return root


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run"], "Missing argument"),
        (["validate", "merge.yml", "--bogus"], "No such option: --bogus"),
        (["run", "space.yml", "--n-trials", "abc"], "'--n-trials'"),
        (["mrege", "merge.yml", "out"], "Did you mean 'merge'?"),
        (["run", "space.yml", "--workers", "-1"], "'--workers'"),
        (["run", "space.yml", "--timeout", "-5"], "'--timeout'"),
        (["front", "space.yml", "--top", "-1"], "'--top'"),
        (["merge", "merge.yml", "out", "--seed", "-3"], "'--seed'"),
        (["export", "space.yml", "out", "--trial", "-2"], "'--trial'"),
    ],
)
def test_usage_errors_are_usage_and_one_error_line(workdir, argv, expected):
    result = evomerge(*argv, cwd=workdir)
    assert expected in error_line(result)
    assert result.stderr.startswith("Usage: evomerge")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "space.yml", "--timeout", "nan"], "--timeout"),
        (["merge", "merge.yml", "out", "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["merge", "merge.yml", "out", "--device", "cuda:99"], "--device cuda:99"),
        (["export", "space.yml", "out", "--device", "cuda:x"], "--device"),
        (["run", "space.yml", "--device", "gpu0"], "--device"),
        (["merge", "merge.yml", "out", "--out-shard-size", "0"], "--out-shard-size"),
        (["merge", "merge.yml", "a_file/out"], "a_file is a file"),
        (["front", "space.yml", "--plot", "."], "is a folder"),
        (["front", "space.yml", "--plot", "front.pdf"], "expected a .png file name"),
    ],
)
def test_bad_values_are_one_line_before_any_work(workdir, argv, expected):
    assert expected in error_line(evomerge(*argv, cwd=workdir))
    assert not (workdir / "out").exists()


def test_taken_dashboard_port_is_one_line(workdir):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = evomerge("dashboard", "space.yml", "--port", str(port), cwd=workdir)
    assert f"--port {port}: 127.0.0.1:{port} is taken by another program" in error_line(result)


def test_help_explains_every_option(workdir):
    for command in ["run", "front", "export", "dashboard", "merge", "validate"]:
        result = evomerge(command, "--help", cwd=workdir)
        assert result.returncode == 0 and "Usage: evomerge" in result.stdout, result.stderr


CRASHING_APP = """
import sys
from evomerge import cli

@cli.app.command("crash")
def crash(kind: str) -> None:
    if kind == "bug":
        raise ZeroDivisionError("division by zero")
    raise PermissionError(13, "Permission denied", "/data/models/base")

cli.main(sys.argv[1:])
"""


def test_bugs_say_so_in_one_line_and_debug_keeps_the_traceback(workdir):
    script = [sys.executable, "-c", CRASHING_APP]
    line = error_line(evomerge("crash", "bug", cwd=workdir, script=script), status=1)
    assert "internal error" in line and "ZeroDivisionError" in line and "--debug" in line
    debug = evomerge("--debug", "crash", "bug", cwd=workdir, script=script)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr
    assert (
        error_line(evomerge("crash", "user", cwd=workdir, script=script))
        == "error: /data/models/base: Permission denied"
    )


def _declared_parameters():
    """(command, parameter, type, typer's ParameterInfo) for every command of the app."""
    import typing

    import typer.models

    from evomerge.cli import app, demo_app

    commands = [
        (c.name or c.callback.__name__, c.callback) for c in [*app.registered_commands, *demo_app.registered_commands]
    ]
    commands.append(("(root)", app.registered_callback.callback))
    for name, callback in commands:
        for parameter, hint in typing.get_type_hints(callback, include_extras=True).items():
            info = next(
                (m for m in getattr(hint, "__metadata__", ()) if isinstance(m, typer.models.ParameterInfo)), None
            )
            if info is not None:
                kinds = set(typing.get_args(hint.__origin__)) or {hint.__origin__}
                yield name, parameter, kinds, info


def test_every_option_is_explained_and_every_number_bounded():
    declared = list(_declared_parameters())
    assert len(declared) > 40
    for command, parameter, kinds, info in declared:
        assert info.help, f"{command} {parameter}: no help text"
        if kinds & {int, float}:
            assert info.min is not None, f"{command} {parameter}: a number without a lower bound"
