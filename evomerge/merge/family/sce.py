"""SCE: select, calculate, erase (https://arxiv.org/abs/2408.07990), as mergekit 0.1.5's `sce`.

Task vectors (model - base) keep only the `select_topk` fraction of entries whose values vary
most across the models; each model is weighted by the mean square of its (selected) task vector,
the weights normalised to sum 1; entries whose sign disagrees with the sign of the models' sum
are erased, and each entry is the weighted mean of the surviving task vectors.

The per-model mean squares are float64 sums of the squares (rounded to the working dtype, as
mergekit rounds them) rather than mergekit's sums in the working dtype; everything else is
mergekit's op chain in the working dtype, so bf16 results match bit for bit on our tests and
float32 ones to ~1e-6 relative. `int8_mask` only chose mergekit's mask storage: accepted and
without effect on the result, there and here.
"""

from __future__ import annotations

import numpy as np
import torch

from evomerge.merge.family.common import model_sum, sum64
from evomerge.merge.registry import MethodSpec, Param

# Below this total of the mean squares every model gets weight 1/n (mergekit's cut).
MIN_WEIGHT_SUM = 1e-6
# The weighted-mean divisor of an entry never goes below this (entries all models erased give 0).
MIN_DIVISOR = 1e-6


def selection_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask (one entry per tensor entry) of the top `fraction` of the entries by variance
    across the models (population variance; only nonzero variances count towards k)."""
    if fraction <= 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    if fraction >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    variance = torch.var(deltas, dim=0, unbiased=False)
    varying = int(torch.count_nonzero(variance))
    # k = int(count * fraction) with the product in float32, as mergekit computes it.
    keep = int(np.float32(varying) * np.float32(fraction))
    mask = torch.zeros(variance.numel(), dtype=torch.bool, device=deltas.device)
    if keep > 0:
        mask[torch.topk(variance.abs().reshape(-1), k=keep, largest=True).indices] = True
    return mask.reshape(variance.shape)


def model_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each model's mean square task-vector entry, normalised to sum 1 (uniform when ~0)."""
    count, numel = deltas.shape[0], deltas[0].numel()
    # Squares rounded to the working dtype (as mergekit squares), summed in float64.
    weights = torch.stack([sum64(delta.square()) / max(numel, 1) for delta in deltas]).to(deltas.dtype)
    total = weights.sum().item()
    if abs(total) < MIN_WEIGHT_SUM:
        return torch.ones_like(weights) / count
    return weights / total


def merge(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    base = tensors[base_index]
    others = [tensor for index, tensor in enumerate(tensors) if index != base_index]
    if not others:
        return base.clone()
    deltas = torch.stack([other - base for other in others])  # [models, *shape]
    if options["select_topk"] < 1:
        deltas = deltas * selection_mask(deltas, options["select_topk"]).to(base.dtype).unsqueeze(0)
    # Erase: an entry survives where its sign equals the sign of the models' sum (0 counts as +).
    majority = torch.where(model_sum(deltas) >= 0, 1, -1).to(base.dtype)
    survives = deltas.sign() == majority
    weights = model_weights(deltas).reshape(-1, *([1] * base.dim()))
    surviving_weights = weights * survives
    merged = model_sum(deltas * surviving_weights) / model_sum(surviving_weights).clamp(min=MIN_DIVISOR)
    return base + merged


SPEC = MethodSpec(
    name="sce",
    params=(
        Param("int8_mask", "global", False),
        # Any finite number, as in mergekit: <= 0 selects nothing (the base), >= 1 everything.
        Param("select_topk", "global", 1.0),
    ),
    base="required",
    min_models=1,  # a lone base is returned unchanged, as in mergekit
    max_models=None,
    random=False,
    doc="SCE: keep the entries that vary most, weight task vectors by mean square, erase minority signs",
    merge=merge,
)
