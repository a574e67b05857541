"""NearSwap: take the other model's value where it is close to the base's, keep the base's elsewhere.

Per entry the other model gets the weight clamp(t / |base - other|, 0, 1): entries that differ
by at most `t` are swapped in whole, larger gaps move less and less. mergekit 0.1.5's `nearswap`;
the same elementwise ops in the same dtype, so the bits equal mergekit's.
"""

from __future__ import annotations

import torch

from evomerge.config.numbers import ParameterRange
from evomerge.merge.registry import MethodSpec, Param

# Gaps below this count as this (mergekit's clamp): t / 0 never happens.
MIN_GAP = 1e-6


def merge(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    base, other = tensors[base_index], tensors[1 - base_index]
    gap = (base - other).abs().clamp(min=MIN_GAP)
    other_weight = (options["t"] / gap).clamp(min=0, max=1)
    return other_weight * other + (1 - other_weight) * base


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
