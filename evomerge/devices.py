"""Which device a merge or a candidate runs on: one check for every command and worker.

`merge --device`, `export --device`, `run --device` / the space file's `device:` and each search
worker all go through `resolve_device`, so a device that does not exist is one line before any
model is read, never a torch error halfway through a merge.
"""

from __future__ import annotations

import re

from evomerge.errors import EvomergeError

DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def resolve_device(requested: str, *, on_this_machine: bool = True, option: str = "--device") -> str:
    """The checked device name: 'auto' becomes 'cuda' where there is a GPU, else 'cpu'.

    With on_this_machine=False (Ray workers on another machine will run it) only the spelling is
    checked; 'auto' is then returned unchanged for each worker to resolve.
    """
    match = _DEVICE_PATTERN.fullmatch(str(requested).strip())
    if match is None:
        raise EvomergeError(f"{option}: expected {DEVICE_FORMS}, got {requested!r}")
    device = match.group(0)
    if not on_this_machine:
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EvomergeError(f"{option} {device}: no CUDA device is available on this machine; use cpu")
        index = match.group(1)
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise EvomergeError(
                f"{option} {device}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
            )
    return device
