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

from typing import Any

import torch

from evomerge.merge.family._reductions import model_sum, norm64, output_dtype, sum64, working_dtype
from evomerge.merge.registry import MethodSpec, Param

# normalize_weights divides by the sum of the weights unless it is below this (then by 1).
MIN_WEIGHT_SUM = 1e-8


def merge(
    tensors: list[torch.Tensor],
    model_params: list[dict[str, float]],
    options: dict[str, Any],
    base_index: int | None,
    seed: int,
) -> torch.Tensor:
    work, result_dtype = working_dtype(tensors), output_dtype(tensors, base_index)
    chosen = [index for index in range(len(tensors)) if index != base_index]
    if len(chosen) == 1:
        return tensors[chosen[0]].to(work).to(result_dtype, copy=True)
    eps = options["eps"]
    base = None if base_index is None else tensors[base_index].to(work)
    points = torch.stack([tensors[index].to(work) for index in chosen])  # [models, *shape]
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
        return (merged if base is None else merged + base).to(result_dtype)
    mean = mean / mean_norm

    # Products rounded to the working dtype (as mergekit multiplies), summed in float64.
    cosines = torch.stack([sum64(unit * mean) for unit in units]).to(work).reshape(-1, 1)
    tangents = units - cosines * mean
    tangent = model_sum(tangents * column)
    length = norm64(tangent).to(work) + eps
    direction = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    mean_norm_of_models = (norms.squeeze(-1) * weights).sum()
    merged = (direction * mean_norm_of_models).reshape(points.shape[1:])
    return (merged if base is None else merged + base).to(result_dtype)


def _check(model_params: list[dict[str, float]], options: dict[str, Any], base_index: int | None) -> None:
    if len(model_params) - (base_index is not None) < 1:
        raise ValueError("multislerp needs at least one model besides the base, got only the base")


SPEC = MethodSpec(
    name="multislerp",
    params=(
        Param("weight", "model", search=(0.0, 1.0), alone="one_hot", uniform="share"),
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
    check=_check,
    searchable=True,
)
