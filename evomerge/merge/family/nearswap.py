"""NearSwap: take the other model's value where it is close to the base's, keep the base's elsewhere.

Per entry the other model gets the weight clamp(t / |base - other|, 0, 1): entries that differ
by at most `t` are swapped in whole, larger gaps move less and less. mergekit 0.1.5's `nearswap`;
the same elementwise ops in the same dtype, so the bits equal mergekit's.
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge.config.numbers import ParameterRange
from evomerge.merge.family._reductions import output_dtype, working_dtype
from evomerge.merge.registry import MethodSpec, Param

# Gaps below this count as this (mergekit's clamp): t / 0 never happens.
MIN_GAP = 1e-6


def merge(
    tensors: list[torch.Tensor],
    model_params: list[dict[str, float]],
    options: dict[str, Any],
    base_index: int | None,
    seed: int,
) -> torch.Tensor:
    work = working_dtype(tensors)
    base, other = tensors[base_index].to(work), tensors[1 - base_index].to(work)
    gap = (base - other).abs().clamp(min=MIN_GAP)
    other_weight = (options["t"] / gap).clamp(min=0, max=1)
    merged = other_weight * other + (1 - other_weight) * base
    return merged.to(output_dtype(tensors, base_index))


SPEC = MethodSpec(
    name="nearswap",
    params=(
        # Any finite number, as in mergekit: t <= 0 keeps the base everywhere. Not slerp's t in [0, 1].
        Param("t", "global", valid=ParameterRange(why="the largest gap that is swapped in whole")),
    ),
    base="required",
    min_models=2,
    max_models=2,
    random=False,
    doc="NearSwap: per entry, take the other model's value where it is within t of the base's",
    merge=merge,
    count_hint=" (a base and one other)",
)
