"""model_stock: interpolate the fine-tunes' mean toward the base by the angles of their task vectors."""

from __future__ import annotations

import torch

from evomerge.merge.family.common import row_dot
from evomerge.merge.registry import MethodSpec, Param


def merge_model_stock(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    base = tensors[base_index]
    others = [tensor for index, tensor in enumerate(tensors) if index != base_index]
    count = len(others)
    shape = base.shape
    if options["filter_wise"] and base.dim() >= 1:
        row_shape = (*shape[:-1], 1)  # one angle per vector along the last dim
        as_rows = lambda x: x.reshape(-1, shape[-1])  # noqa: E731
    else:
        row_shape = (1,) * base.dim()
        as_rows = lambda x: x.reshape(1, -1)  # noqa: E731
    offsets = [as_rows(tensor - base) for tensor in others]
    norms = [row_dot(offset, offset).sqrt() for offset in offsets]
    cosines = [
        (row_dot(offsets[i], offsets[j]) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    # |denominator| ~ 0 (opposed task vectors): no finite estimate, keep the base (as mergekit 0.1.5).
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, 1, denominator))
    t = t.to(base.dtype).reshape(row_shape)
    average = others[0].clone()
    for tensor in others[1:]:
        average += tensor
    average /= count
    return t * average + (1 - t) * base


SPEC = MethodSpec(
    name="model_stock",
    params=(Param("filter_wise", "global", default=False),),
    base="required",
    min_models=3,
    max_models=None,
    random=False,
    doc="Model Stock: interpolate the models' mean toward the base by their task-vector angles",
    merge=merge_model_stock,
    count_hint=" (a base and at least 2 others)",
    searchable=True,  # no genes: the genome only chooses it
)
