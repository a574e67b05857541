"""passthrough: one model's tensor, optionally scaled (mergekit's way to stack layer ranges)."""

from __future__ import annotations

import torch

from evomerge.merge.registry import MethodSpec, Param


def merge_passthrough(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    scale = model_params[0]["scale"]
    return tensors[0] * scale if scale != 1 else tensors[0].clone()


SPEC = MethodSpec(
    name="passthrough",
    # mergekit's default scale is None (no scaling): the same result as 1.0
    params=(Param("scale", "model", default=1.0),),
    base="unused",
    min_models=1,
    max_models=1,
    random=False,
    doc="copy one model's tensor, optionally multiplied by `scale`",
    merge=merge_passthrough,
)
