"""Helpers the method families share: the result tensor and float64 row reductions."""

from __future__ import annotations

import torch

from evomerge.merge.registry import Param

# Elements per float64 reduction chunk (bounds scratch memory on huge tensors).
_CHUNK = 1 << 20


def result_tensor(like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` when the caller gave one, else a new tensor shaped and typed like `like`."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device) if out is None else out


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row sum(a * b) of two [rows, cols] tensors, float64, a block of rows at a time."""
    rows, cols = a.shape
    step = max(1, _CHUNK // max(cols, 1))
    parts = [
        (a[start : start + step].to(torch.float64) * b[start : start + step].to(torch.float64)).sum(dim=1)
        for start in range(0, rows, step)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=a.device)


# The per-model weight as a gene: any value a config gives, searched in [0, 1]; one parent alone
# is weight 1 for it and 0 for the others, the uniform mix 1/n each.
WEIGHT = Param("weight", "model", search=(0.0, 1.0), alone="one_hot", uniform="share")
