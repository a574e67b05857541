"""Arcee Fusion: take the other model's entries whose change matters most, keep the base elsewhere.

An entry's importance is |other - base| times the KL divergence of softmax(other) from
softmax(base) along its row (the last dim, 1e-8 added to both distributions). Entries whose
importance reaches median + 1.5 * IQR of all importances take the other model's value. The
quartiles are read from the sorted importances, or from a sample of SAMPLE_SIZE of them drawn
with replacement for larger tensors. mergekit 0.1.5's `arcee_fusion`, op for op in the same
dtypes (bf16 inputs: the result is computed in float32, then cast back), so the bits equal
mergekit's given the same sample. mergekit draws that sample from the global RNG; we draw it
from a CPU generator seeded by `seed`: the same seed gives the same weights on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evomerge.merge.registry import MethodSpec
from evomerge.merge.sparsify import make_generator

SAMPLE_SIZE = 1_000_000
# Added to both softmax distributions so the log ratio stays finite (mergekit's).
PROBABILITY_FLOOR = 1e-8


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|other - base| times the per-row KL(softmax(other) || softmax(base))."""
    p = F.softmax(other, dim=-1) + PROBABILITY_FLOOR
    q = F.softmax(base, dim=-1) + PROBABILITY_FLOOR
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * divergence


def quantile_sample(values: torch.Tensor, seed: int) -> torch.Tensor:
    """The flattened values, or SAMPLE_SIZE of them drawn with replacement when there are more."""
    flat = values.reshape(-1)
    if flat.numel() <= SAMPLE_SIZE:
        return flat
    generator = make_generator(seed, 0, "cpu")
    picks = torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=generator)
    return flat[picks.to(flat.device)]


def threshold(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """median + 1.5 * (q3 - q1), each quartile the sorted sample's entry at floor(q * (n - 1))."""
    ordered = torch.sort(quantile_sample(scores, seed)).values
    last = ordered.numel() - 1
    first_quartile, median, third_quartile = ordered[last // 4], ordered[last // 2], ordered[3 * last // 4]
    return median + 1.5 * (third_quartile - first_quartile)


def merge(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    base, other = tensors[base_index], tensors[1 - base_index]
    scores = importance(other, base)
    taken = (scores >= threshold(scores, seed)).to(torch.float32)  # float32, as mergekit's mask
    return (base + (other - base) * taken).to(base.dtype)


SPEC = MethodSpec(
    name="arcee_fusion",
    params=(),
    base="required",
    min_models=2,
    max_models=2,
    random=True,  # samples the importances of tensors larger than SAMPLE_SIZE
    doc="Arcee Fusion: take the other model's entries whose importance is an outlier (median + 1.5 IQR)",
    merge=merge,
    count_hint=" (a base and one other)",
)
