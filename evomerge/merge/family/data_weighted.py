"""fisher and regmean: merges weighted by statistics of each model on a little data.

Both take, besides the source tensors, one statistic per source tensor (`statistics=`), computed
once and cached by `evomerge.data_stats`:

* fisher (Matena & Raffel, "Merging Models with Fisher Weighting"): the diagonal empirical Fisher
  F_i of each model, same shape as the tensor. theta* = sum_i w_i F_i theta_i / sum_i w_i F_i,
  each F_i floored at `fisher_floor` first, so entries no model's data touches get the (weighted)
  plain average instead of 0/0.
* regmean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models"): for a
  linear layer's weight W_i ([out, in], torch's layout) the Gram matrix G_i = X_i^T X_i ([in, in])
  of the layer's inputs. With G~_i = alpha G_i + (1 - alpha) diag(G_i) (off-diagonals shrunk),
  W* = (sum_i W_i G~_i)(sum_i G~_i)^-1, the minimiser of sum_i ||X_i W^T - X_i W_i^T||^2 for
  alpha = 1. Tensors without a Gram (norms, embeddings, biases) are averaged.

A listed base model takes no part. Tensors with no statistic for some fine-tune (e.g. a parameter the data never reaches) are averaged.
The math runs in float64 (float32 inputs are small against a Gram solve's conditioning) and is
cast back to the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from evomerge.config.numbers import ParameterRange
from evomerge.merge.family.common import WEIGHT
from evomerge.merge.registry import MethodSpec, Param


def _average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(weights)
    total = total if abs(total) >= 1e-8 else 1.0
    merged = sum(w * t.to(torch.float64) for w, t in zip(weights, tensors))
    return (merged / total).to(tensors[0].dtype)


def _without_base(tensors, model_params, statistics, base_index):
    """The fine-tunes' tensors, parameters and statistics: a listed base takes no part."""
    keep = [index for index in range(len(tensors)) if index != base_index]
    stats = None if statistics is None else [statistics[index] for index in keep]
    return [tensors[index] for index in keep], [model_params[index] for index in keep], stats


def merge_fisher(tensors, model_params, options, base_index, seed, statistics=None) -> torch.Tensor:
    tensors, model_params, statistics = _without_base(tensors, model_params, statistics, base_index)
    weights = [float(params.get("weight", 1.0)) for params in model_params]
    if statistics is None or any(stat is None for stat in statistics):
        return _average(tensors, weights)
    floor = float(options["fisher_floor"])
    numerator = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    denominator = torch.zeros_like(numerator)
    for tensor, weight, fisher in zip(tensors, weights, statistics):
        if fisher.shape != tensor.shape:
            raise ValueError(f"a Fisher of shape {list(fisher.shape)} for a tensor of shape {list(tensor.shape)}")
        scaled = fisher.to(device=tensor.device, dtype=torch.float64).clamp(min=floor) * weight
        numerator.add_(scaled * tensor.to(torch.float64))
        denominator.add_(scaled)
    return (numerator / denominator).to(tensors[0].dtype)


def shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): the off-diagonal entries scaled by alpha."""
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1 - alpha)


def merge_regmean(tensors, model_params, options, base_index, seed, statistics=None) -> torch.Tensor:
    tensors, model_params, statistics = _without_base(tensors, model_params, statistics, base_index)
    first = tensors[0]
    if statistics is None or any(stat is None for stat in statistics) or first.dim() != 2:
        return _average(tensors, [1.0] * len(tensors))
    alpha = float(options["alpha"])
    width = first.shape[1]
    gram_sum = torch.zeros((width, width), dtype=torch.float64, device=first.device)
    weighted = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    for tensor, gram in zip(tensors, statistics):
        if gram.shape != (width, width):
            raise ValueError(f"a Gram matrix of shape {list(gram.shape)} for a weight of shape {list(first.shape)}")
        shrunk = shrink_gram(gram.to(device=first.device, dtype=torch.float64), alpha)
        gram_sum.add_(shrunk)
        weighted.add_(tensor.to(torch.float64) @ shrunk)
    # W* S = R with S symmetric: W*^T = S^-1 R^T. An input that is always zero makes S singular:
    # the least-squares (minimum-norm) solution then leaves those columns at 0 contribution.
    try:
        merged = torch.linalg.solve(gram_sum, weighted.T).T
    except RuntimeError:
        merged = (torch.linalg.pinv(gram_sum) @ weighted.T).T
    return merged.to(first.dtype)


FISHER = MethodSpec(
    name="fisher",
    params=(
        replace(WEIGHT, default=1.0),  # the weight gene of linear & co.; 1 each when a config omits it
        Param("fisher_floor", "global", default=1e-6, valid=ParameterRange(low=0.0)),
    ),
    base="optional",  # a listed base takes no part (mergekit YAMLs often name one)
    min_models=2,
    max_models=None,
    random=False,
    doc="Fisher merging: per-entry average weighted by each model's diagonal Fisher on its own data (needs data:)",
    merge=merge_fisher,
    statistic="fisher",
    searchable=True,  # a search computes the statistics once per worker (evomerge.data_stats.for_space)
)

REGMEAN = MethodSpec(
    name="regmean",
    # alpha, the shrinkage of the Grams' off-diagonals, is its gene in a search
    params=(Param("alpha", "global", default=0.1, valid=ParameterRange(low=0.0, high=1.0), search=(0.0, 1.0)),),
    base="optional",  # a listed base takes no part (mergekit YAMLs often name one)
    min_models=2,
    max_models=None,
    random=False,
    doc="RegMean: per linear layer the closed form over each model's input Gram matrix; other tensors averaged (needs data:)",
    merge=merge_regmean,
    statistic="gram",
    searchable=True,
)

SPECS = (FISHER, REGMEAN)
