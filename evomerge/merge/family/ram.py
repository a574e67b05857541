"""RAM and RAM+ (tensor-local): merge task vectors by how many models change each entry.

An entry of a task vector (model - base) is active when |delta| > epsilon. Entries only one
model changes are taken whole, entries several models change are averaged over those models,
entries nobody changes keep the base. `ramplus_tl` also scales each model's unique entries by
1 + r * clamp(shared/unique, 0, alpha), its counts of active entries it shares and owns in this
tensor. mergekit 0.1.5's `ram` and `ramplus_tl`, op for op in the same dtypes: equal bits.
"""

from __future__ import annotations

import torch

from evomerge.merge.family.common import model_sum
from evomerge.merge.registry import MethodSpec, Param


def _merge(tensors: list[torch.Tensor], base_index: int, epsilon: float, r: float | None, alpha: float) -> torch.Tensor:
    base = tensors[base_index]
    if len(tensors) == 1:
        return base.clone()
    deltas = torch.stack([t - base for i, t in enumerate(tensors) if i != base_index])
    deltas = deltas.reshape(deltas.shape[0], -1)  # [models, entries]
    active = deltas.abs() > epsilon  # [models, entries]
    contributors = active.sum(dim=0, keepdim=True)  # int64 [1, entries]
    shared, unique = contributors > 1, contributors == 1
    kept = deltas * active
    averaged = kept * shared / contributors.clamp(min=1)
    owned = kept * unique
    if r is not None:
        # Per model: its active entries others share / those it alone changes (float32, as mergekit).
        shared_count = (active & shared).sum(dim=1)
        unique_count = (active & unique).sum(dim=1)
        ratio = shared_count / unique_count.clamp(min=epsilon).to(torch.float32)
        boost = 1 + r * ratio.clamp(min=0, max=alpha)
        owned = owned * boost.unsqueeze(-1)  # float32 for bf16 inputs, as in mergekit
    merged = base + model_sum(owned + averaged).reshape(base.shape)
    return merged.to(base.dtype)


def merge_ram(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    return _merge(tensors, base_index, options["epsilon"], None, 0.0)


def merge_ramplus_tl(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    return _merge(tensors, base_index, options["epsilon"], options["r"], options["alpha"])


# Not a gene: della's per-model `epsilon` gene means something else.
_EPSILON = Param("epsilon", "global", 1e-5)

SPEC = MethodSpec(
    name="ram",
    params=(_EPSILON,),
    base="required",
    min_models=1,  # a lone base is returned unchanged, as in mergekit
    max_models=None,
    random=False,
    doc="RAM: add task-vector entries one model changes, average those several models change",
    merge=merge_ram,
)

SPEC_PLUS_TL = MethodSpec(
    name="ramplus_tl",
    params=(Param("r", "global", 0.1), Param("alpha", "global", 0.2), _EPSILON),
    base="required",
    min_models=1,
    max_models=None,
    random=False,
    doc="RAM+ (tensor-local): RAM with each model's unique entries boosted by its share of overlap",
    merge=merge_ramplus_tl,
)
