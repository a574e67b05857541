"""linear: the weighted average of the models (a listed base is one more weighted input)."""

from __future__ import annotations

import torch

from evomerge.merge import blocks
from evomerge.merge.family.common import WEIGHT, result_tensor
from evomerge.merge.registry import MethodSpec, Param


def merge_linear(tensors, model_params, options, base_index, seed, out=None) -> torch.Tensor:
    first = tensors[0]
    # Accumulate in float32 (float64 for float64 inputs), as mergekit 0.1.5 does, then cast back.
    accumulate = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([params["weight"] for params in model_params], dtype=accumulate, device=first.device)
    # The divisor is the sum of the weights as rounded to the accumulation dtype (mergekit's).
    total = weights.sum()
    # Difference 3 (methods.py): mergekit divides by a ~0 sum here (inf/NaN); we use divisor 1 like GTA.
    divide = options["normalize"] and abs(float(total)) >= 1e-8
    result = result_tensor(first, out)
    sources, target = [blocks.flat(t) for t in tensors], blocks.flat(result)
    scratch = torch.empty(min(blocks.block_size(first.device), target.numel()), dtype=accumulate, device=first.device)
    for start, stop in blocks.blocks(target.numel(), first.device):
        acc = scratch[: stop - start].zero_()
        for source, weight in zip(sources, weights):
            acc.addcmul_(source[start:stop], weight)
        if divide:
            acc.div_(total)
        target[start:stop].copy_(acc)
    return result


SPEC = MethodSpec(
    name="linear",
    params=(
        WEIGHT,
        Param("normalize", "global", default=True),
    ),
    base="unused",
    min_models=1,
    max_models=None,
    random=False,
    doc="weighted average of the models (a listed base is one more weighted input)",
    merge=merge_linear,
    writes_out=True,
    searchable=True,
    parent_rank=1,
    uniform_rank=1,
)
