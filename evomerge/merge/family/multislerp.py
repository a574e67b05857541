"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere.

Each model (minus the base, when one is given) is one flat vector, split into norm and unit
direction. The directions are mapped to the tangent space at their weighted mean direction,
averaged there with the weights, mapped back by the exponential map, and scaled by the weighted
mean norm; the base is added back. With a single model besides the base that model is the
result. mergekit 0.1.5's `multislerp`: its elementwise ops in the same dtype; its norms and dots
are float64 sums here, rounded to the working dtype as mergekit's are, so results agree with
mergekit to float rounding. One deliberate difference: with `normalize_weights` and weights
summing to ~0 we keep the weights as given, as `linear` does, where mergekit divides by ~0.
"""

from __future__ import annotations

import torch

from evomerge.merge.family.common import WEIGHT, model_sum, norm64, sum64
from evomerge.merge.registry import MethodSpec, Param

# normalize_weights divides by the sum of the weights unless it is below this (then by 1).
MIN_WEIGHT_SUM = 1e-8


def merge(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    chosen = [index for index in range(len(tensors)) if index != base_index]
    if len(chosen) == 1:
        return tensors[chosen[0]].clone()
    work = tensors[0].dtype
    eps = options["eps"]
    base = None if base_index is None else tensors[base_index]
    points = torch.stack([tensors[index] for index in chosen])  # [models, *shape]
    if base is not None:
        points -= base
    vectors = points.reshape(len(chosen), -1)
    weights = torch.tensor([model_params[index]["weight"] for index in chosen], dtype=work, device=vectors.device)
    total = weights.sum()
    # Weights summing to ~0 are not divided by that sum (mergekit: inf/NaN): linear's rule.
    if options["normalize_weights"] and abs(float(total)) >= MIN_WEIGHT_SUM:
        weights = weights / total
    column = weights.reshape(-1, 1)

    norms = torch.stack([norm64(vector) for vector in vectors]).to(work).reshape(-1, 1)
    units = vectors / (norms + eps)
    mean = model_sum(units * column)
    mean_norm = norm64(mean).to(work)
    if mean_norm < eps:  # the weighted directions cancel out
        if len(chosen) != 2:
            raise ValueError(
                "multislerp: the weighted mean of the models' directions is zero (opposite models whose "
                "weights balance out); use other weights"
            )
        merged = (points[0] * weights[0] + points[1] * weights[1]).reshape(points.shape[1:])  # plain lerp
        return merged if base is None else merged + base
    mean = mean / mean_norm

    # Products rounded to the working dtype (as mergekit multiplies), summed in float64.
    cosines = torch.stack([sum64(unit * mean) for unit in units]).to(work).reshape(-1, 1)
    tangents = units - cosines * mean
    tangent = model_sum(tangents * column)
    length = norm64(tangent).to(work) + eps
    direction = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    mean_norm_of_models = (norms.squeeze(-1) * weights).sum()
    merged = (direction * mean_norm_of_models).reshape(points.shape[1:])
    return merged if base is None else merged + base


def _check_models(count: int, base_index: int | None) -> None:
    if count - (base_index is not None) < 1:
        raise ValueError("multislerp needs at least one model besides the base, got only the base")


SPEC = MethodSpec(
    name="multislerp",
    params=(
        WEIGHT,
        Param("normalize_weights", "global", True),
        Param("eps", "global", 1e-8),
    ),
    base="optional",
    min_models=1,
    max_models=None,
    random=False,
    doc="Multi-SLERP: weighted spherical mean of any number of models (or their deltas from a base)",
    merge=merge,
    count_hint=" (at least one besides an optional base)",
    check_models=_check_models,
    searchable=True,
)
