"""What every benchmark writes beside its table: the machine, and its own section of a results file."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown CPU"


def machine_line(torch_module, *, threads: str = "") -> str:
    """`Machine: <cpu>, N CPU cores (shared with other jobs), <GPU or none>, torch X[, threads]`."""
    gpu = f"GPU {torch_module.cuda.get_device_name(0)}" if torch_module.cuda.is_available() else "no GPU"
    extra = f", {threads}" if threads else ""
    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores (shared with other jobs), {gpu}, "
        f"torch {torch_module.__version__}{extra}, Python {platform.python_version()}"
    )


def write_section(path: Path, name: str, body: str, *, title: str = "# Measurements") -> None:
    """Put `body` between `<!-- BEGIN name -->` and `<!-- END name -->` in `path` (appended when the
    markers are missing), leaving the rest of the file as it is."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else f"{title}\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
