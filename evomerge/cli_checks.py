"""Up-front checks of command-line values, run while the command line is parsed.

Each check is a typer option callback (or a plain function the command calls first), so a value
that cannot work (an output folder under a file, a device this machine lacks, a taken port, a
NaN timeout) is one line before any model, study or server is touched. Failures raise
EvomergeError; `evomerge.cli.main` prints them as `error: ...` with exit status 2.
"""

from __future__ import annotations

import errno
import math
import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from evomerge.errors import EvomergeError

SEED_MAX = 2**32 - 1  # numpy's RandomState (optuna's samplers) takes 0 .. 2**32 - 1
WORKERS_MAX = 1024
TRIALS_MAX = 10**9
PORT_MAX = 65535

# The --overwrite option of every command that writes a checkpoint folder (staged_output).
OverwriteOutput = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an earlier evomerge output in OUT_DIR (never other files; swapped in only once complete).",
    ),
]


def _existing_ancestor(path: Path) -> Path:
    """The nearest part of `path` (itself included) that exists."""
    candidate = path.absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def _check_creatable(path: Path, what: str) -> None:
    """`path` exists or can be created by us: its existing ancestor is a writable folder."""
    limit = 255
    ancestor = _existing_ancestor(path)
    if ancestor.is_dir():
        try:
            limit = os.pathconf(ancestor, "PC_NAME_MAX")
        except (OSError, ValueError):
            pass
    too_long = [part for part in path.parts if len(os.fsencode(part)) > limit]
    if too_long:
        raise EvomergeError(f"{path}: the {what} name {too_long[0][:40]!r}... is longer than {limit} bytes")
    if not ancestor.is_dir():
        raise EvomergeError(f"{path}: cannot create the {what}: {ancestor} is a file, not a folder")
    if ancestor != path.absolute() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise EvomergeError(
            f"{path}: cannot create the {what}: {ancestor} is not writable (permissions or a read-only file system)"
        )


def output_dir(path: Path | None) -> Path | None:
    """An output folder: absent (it will be created), or an existing folder we may write into."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise EvomergeError(f"{path}: exists and is not a folder")
    _check_creatable(path, "output folder")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise EvomergeError(f"{path}: the output folder is not writable (permissions or a read-only file system)")
    return path


def output_file(path: Path | None) -> Path | None:
    """A file to write (a plot): not a folder, and its folder exists or can be created."""
    if path is None:
        return None
    if path.is_dir():
        raise EvomergeError(f"{path}: is a folder; give a file name such as {path / 'front.png'}")
    if path.exists():  # an earlier plot: replaced, if we may write it
        if not os.access(path, os.W_OK):
            raise EvomergeError(f"{path}: the file is not writable")
        return path
    _check_creatable(path, "file")
    return path


def png_file(path: Path | None) -> Path | None:
    """`front --plot`: a writable .png path (the page beside it takes the .html suffix)."""
    output_file(path)
    if path is not None and path.suffix.lower() != ".png":
        raise EvomergeError(f"--plot {path}: expected a .png file name (an HTML page is written beside it)")
    return path


def positive_seconds(value: float | None) -> float | None:
    """A duration: finite and above zero (typer's FloatRange lets nan and inf through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise EvomergeError(f"--timeout: expected a positive number of seconds, got {value}")
    return value


def shard_size(value: str) -> str:
    """`--out-shard-size`: a size evomerge can write shards of (at least 1 byte)."""
    from evomerge.io.safetensors_io import parse_size

    if parse_size(value) < 1:
        raise EvomergeError(f"--out-shard-size: expected a size of at least 1 byte (e.g. 5B or 500M), got {value!r}")
    return value


def device_here(value: str | None) -> str | None:
    """`--device` for work done on this machine (merge, export)."""
    from evomerge.devices import resolve_device

    if value is not None:
        resolve_device(value)
    return value


def device_spelling(value: str | None) -> str | None:
    """`run --device`: the spelling now; the workers check that the device exists where they run."""
    from evomerge.devices import resolve_device

    if value is not None:
        resolve_device(value, on_this_machine=False)
    return value


def check_port_free(host: str, port: int) -> None:
    """Refuse a dashboard port that another program holds, or a host that is not this machine."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise EvomergeError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = addresses[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is fine
            probe.bind(address)
    except OSError as exc:
        reason = (
            "is taken by another program; choose another --port"
            if exc.errno == errno.EADDRINUSE
            else f"cannot be used ({exc.strerror})"
        )
        raise EvomergeError(f"--port {port}: {host}:{port} {reason}") from None
