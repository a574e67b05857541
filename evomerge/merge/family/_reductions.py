"""Helpers the newer mergekit methods share: the working dtype, model-axis sums, float64 reductions.

mergekit promotes a tensor group to one dtype and reduces in it; we do the elementwise math in that
same dtype (so results match it bit for bit), but whole-tensor scalars (norms, dots, mean squares)
are summed in float64 in fixed chunks and only then rounded to the dtype mergekit holds them in, so
they do not depend on torch's thread count or reduction order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

# Elements per float64 reduction chunk (bounds the float64 scratch on huge tensors).
CHUNK = 1 << 20


def working_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype every input is promoted to before the math (mergekit's promotion)."""
    return functools.reduce(torch.promote_types, (tensor.dtype for tensor in tensors))


def output_dtype(tensors: Sequence[torch.Tensor], base_index: int | None) -> torch.dtype:
    """Results are cast to the base model's dtype, or the first tensor's without a base."""
    return tensors[0 if base_index is None else base_index].dtype


def model_sum(rows: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 (the model axis) in model order, accumulated in float32 (float64 for float64)
    and rounded to the rows' dtype once: torch.sum(dim=0)'s result for up to 4 models, in an order
    of our own for more (torch reorders the last columns of 5+ rows)."""
    accumulate = torch.float64 if rows.dtype == torch.float64 else torch.float32
    total = torch.zeros(rows.shape[1:], dtype=accumulate, device=rows.device)
    for row in rows:
        total.add_(row)
    return total if total.dtype == rows.dtype else total.to(rows.dtype)


def dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over the flattened tensors, products and sum in float64 (a 0-d float64 tensor)."""
    a, b = a.reshape(-1), b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), CHUNK):
        total += torch.dot(a[start : start + CHUNK].to(torch.float64), b[start : start + CHUNK].to(torch.float64))
    return total


def sum64(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of all entries in float64 (a 0-d float64 tensor)."""
    flat = tensor.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=tensor.device)
    for start in range(0, flat.numel(), CHUNK):
        total += flat[start : start + CHUNK].to(torch.float64).sum()
    return total


def norm64(tensor: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of the flattened tensor in float64 (a 0-d float64 tensor)."""
    return dot64(tensor, tensor).sqrt()
