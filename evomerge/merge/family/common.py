"""Helpers the method families share: the result tensor, model-order sums and float64 reductions.

Elementwise math runs in the inputs' dtype (as mergekit's); scalars that come from whole-tensor
reductions (norms, dots, mean squares, L1 norms) are summed in float64 in fixed chunks, so they
do not depend on torch's thread count or reduction order.
"""

from __future__ import annotations

import torch

from evomerge.merge.registry import Param

# Elements per float64 reduction chunk (bounds the float64 scratch on huge tensors).
CHUNK = 1 << 20


def result_tensor(like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` when the caller gave one, else a new tensor shaped and typed like `like`."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device) if out is None else out


def model_sum(rows: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over dim 0 (the model axis) in model order, accumulated from +0 in float32 (float64 for
    float64) and rounded to the rows' dtype once: torch.sum(dim=0)'s result for up to 4 models, in
    an order of our own for more (torch adds the last columns of 5+ rows in another order, which
    would tie weight hashes to torch's internals; the fused C kernel adds in this order too).
    `scratch` (1-D, the accumulation dtype, at least rows.shape[1] long) saves the allocation."""
    if scratch is None:
        accumulate = torch.float64 if rows.dtype == torch.float64 else torch.float32
        total = torch.zeros(rows.shape[1:], dtype=accumulate, device=rows.device)
    else:
        total = scratch[: rows.shape[1]].zero_()
    for row in rows:
        total.add_(row)
    return total if total.dtype == rows.dtype else total.to(rows.dtype)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row sum(a * b) of two [rows, cols] tensors, float64, a block of rows at a time."""
    rows, cols = a.shape
    step = max(1, CHUNK // max(cols, 1))
    parts = [
        (a[start : start + step].to(torch.float64) * b[start : start + step].to(torch.float64)).sum(dim=1)
        for start in range(0, rows, step)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=a.device)


def dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over the flattened tensors, products and sum in float64 (a 0-d float64 tensor)."""
    a, b = a.reshape(-1), b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), CHUNK):
        total += torch.dot(a[start : start + CHUNK].to(torch.float64), b[start : start + CHUNK].to(torch.float64))
    return total


def sum64(tensor: torch.Tensor, *, absolute: bool = False) -> torch.Tensor:
    """The sum of all entries (of their magnitudes with `absolute`) in float64 (a 0-d tensor)."""
    flat = tensor.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=tensor.device)
    for start in range(0, flat.numel(), CHUNK):
        chunk = flat[start : start + CHUNK].to(torch.float64)
        total += (chunk.abs() if absolute else chunk).sum()
    return total


def norm64(tensor: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of the flattened tensor in float64 (a 0-d float64 tensor)."""
    return dot64(tensor, tensor).sqrt()


# The per-model weight as a gene: any value a config gives, searched in [0, 1]; one parent alone
# is weight 1 for it and 0 for the others, the uniform mix 1/n each.
WEIGHT = Param("weight", "model", search=(0.0, 1.0), alone="one_hot", uniform="share")
