"""Karcher mean: the weighted Riemannian mean of the models' directions, scaled by their mean norm.

Each tensor is one flat vector, split into its norm and its direction on the unit sphere. The
mean direction starts at the normalised average of the directions and moves along the sphere
(exponential map) by the weighted average of the log maps until the step is below `tol` or
after `max_iter` steps. The result is that direction times the average norm. All models weigh
1/n (no per-model weights) and a listed base is one more input. mergekit 0.1.5's `karcher`:
its elementwise ops in the same dtype; its norms and dots are float64 sums here, rounded to the
dtype mergekit holds them in, so results agree to float rounding rather than bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge.merge.family.common import dot64, norm64
from evomerge.merge.registry import MethodSpec, Param


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher mean of same-dtype tensors (see the module docstring)."""
    count = len(tensors)
    weights = [1.0 / count] * count
    # Scalars are held in float32 (float64 for float64 inputs), as mergekit holds them.
    scalar = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [norm64(tensor).to(scalar) for tensor in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    # Tensors of norm <= tol have no direction: left out of the mean direction, counted as 0 in the norm.
    directed = [index for index, norm in enumerate(norms) if norm.item() > tol]
    if not directed:
        return torch.zeros_like(tensors[0])
    directed_total = sum(weights[index] for index in directed)
    pull = [(weights[index] / directed_total, units[index]) for index in directed]

    mean = torch.zeros_like(units[directed[0]])
    for weight, unit in pull:
        mean += weight * unit
    mean_norm = norm64(mean).to(scalar)
    mean = units[directed[0]].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in pull:
            cosine = torch.clamp(dot64(mean, unit).to(mean.dtype), -1.0, 1.0)
            angle = torch.arccos(cosine)
            if angle.item() < tol:
                continue
            tangent += weight * (angle / torch.sin(angle)) * (unit - cosine * mean)
        step = norm64(tangent).to(scalar)
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = norm64(mean).to(scalar)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    mean_length = sum(weight * norm for weight, norm in zip(weights, norms))
    return mean_length * mean


def merge(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    return karcher_mean(tensors, int(options["max_iter"]), options["tol"]).to(tensors[0].dtype)


def _check(model_params: list[dict[str, float]], options: dict[str, Any], base_index: int | None) -> None:
    if not float(options["max_iter"]).is_integer():
        raise ValueError(f"parameter 'max_iter' must be a whole number, got {options['max_iter']:g}")


SPEC = MethodSpec(
    name="karcher",
    params=(
        Param("max_iter", "global", 10),  # any whole number, as in mergekit: <= 0 takes no step
        Param("tol", "global", 1e-5),
    ),
    base="unused",
    min_models=1,
    max_models=None,
    random=False,
    doc="Karcher mean: the models' mean direction on the sphere, scaled by their mean norm",
    merge=merge,
    check=_check,
)
