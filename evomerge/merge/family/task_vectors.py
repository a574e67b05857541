"""The generalized task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

One pipeline (as mergekit's): deltas vs the base -> per-model sparsify with its own density ->
weight -> optional sign consensus -> optional normalisation -> lambda -> base + mixed. A method
is a `TaskVectorKind` (its sparsifier and whether it elects signs) and its defaults. Whole-tensor
statistics come first (trim.py), then the elementwise chain runs per cache-sized block; on CPU
the fused C kernel takes the whole chain when it can (fused_dispatch.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from evomerge.config.numbers import ParameterRange
from evomerge.merge import blocks, sparsify
from evomerge.merge.family.common import WEIGHT, model_sum, result_tensor
from evomerge.merge.fused_dispatch import native_eligible, native_task_vectors
from evomerge.merge.registry import MethodSpec, Param
from evomerge.merge.trim import TaskVectorKind, mix_weights, plan_trim


def _combine(flat_base, flat_sources, trims, weights, kind: TaskVectorKind, options, divisor, target) -> None:
    """The eager elementwise chain over flat tensors, one cache-sized block at a time: trim,
    weight, optional sign consensus and normalisation, lambda, base + mixed."""
    # One buffer for all deltas of a block (as mergekit stacks them).
    size = min(blocks.block_size(flat_base.device), target.numel())
    scratch = flat_base.new_empty((len(flat_sources), size))
    accumulate = torch.float64 if flat_base.dtype == torch.float64 else torch.float32
    sums = flat_base.new_empty((3, size), dtype=accumulate)
    for start, stop in blocks.blocks(target.numel(), flat_base.device):
        deltas = scratch[:, : stop - start]
        base_block = flat_base[start:stop]
        for row, (source, trim) in enumerate(zip(flat_sources, trims)):
            trim.apply(torch.sub(source[start:stop], base_block, out=deltas[row]), start, stop)
        deltas.mul_(weights)
        if kind.consensus:
            # Majority sign = sign of the total weighted mass (0 counts as +). A pruned entry
            # has sign 0 and never agrees, so it neither contributes nor counts in the divisor.
            # sign(delta) == majority sign <=> where(majority >= 0, delta > 0, delta < 0),
            # in two ops instead of three (0 and NaN never agree either way).
            majority = torch.where(model_sum(deltas, sums[0]) >= 0, 1.0, -1.0).to(deltas.dtype)
            agrees = torch.sign(deltas) == majority
            mixed = model_sum(deltas.mul_(agrees), sums[1])
            if options["normalize"]:  # the per-element divisor costs a pass over all deltas
                divisor = model_sum(weights * agrees, sums[2])
                divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed = model_sum(deltas, sums[1])
        if options["normalize"]:
            mixed /= divisor
        if options["lambda"] != 1:
            mixed *= options["lambda"]
        torch.add(base_block, mixed, out=target[start:stop])


def _no_cache(index: int, compute: Callable[[], torch.Tensor]) -> sparsify.KeyHistogram:
    return sparsify.KeyHistogram.of(compute())


def _merge_function(kind: TaskVectorKind) -> Callable[..., torch.Tensor]:
    def merge(tensors, model_params, options, base_index, seed, out=None, histogram=_no_cache) -> torch.Tensor:
        base = tensors[base_index]
        sources = [index for index in range(len(tensors)) if index != base_index]
        result = result_tensor(base, out)
        if not sources or base.numel() == 0:
            return result.copy_(base)
        target = blocks.flat(result)
        if native_eligible(kind, options, base.dtype, base.device.type):
            native_task_vectors(kind, tensors, model_params, options, base_index, seed, target, histogram)
            return result
        weights, divisor = mix_weights(kind, sources, model_params, options, base.dtype, base.device)
        trims = [
            plan_trim(kind.sparsifier, tensors[i], base, model_params[i], options["rescale"], seed, i) for i in sources
        ]
        flat_sources = [blocks.flat(tensors[i]) for i in sources]
        _combine(blocks.flat(base), flat_sources, trims, weights, kind, options, divisor, target)
        return result

    return merge


# -- the methods' parameters -----------------------------------------------------------------------
def _check_gamma(model_params: list[dict[str, float]], options: dict[str, Any], base_index: int | None) -> None:
    for index, params in enumerate(model_params):
        if index != base_index and not 0 <= params["gamma"] <= 1:
            raise ValueError(f"gamma of model {index} must be in [0, 1], got {params['gamma']:g}")


def _check_della(model_params: list[dict[str, float]], options: dict[str, Any], base_index: int | None) -> None:
    for index, params in enumerate(model_params):
        if index != base_index:
            try:
                sparsify.check_della(params["density"], params["epsilon"])
            except ValueError as exc:
                raise ValueError(f"{exc} (model {index})") from None


_DENSITY_RANGE = ParameterRange(
    0.0, 1.0, lenient_high=True, why="it keeps every entry, as density 1 does (mergekit accepts it too)"
)
_GAMMA = Param(
    "gamma", "model", default=0.01,
    valid=ParameterRange(0.0, 1.0, why="the fraction of largest entries breadcrumbs drops"),
    search=0.01, alone=0.0, uniform=0.0,
)  # fmt: skip
# At density 1 (both seeds) epsilon does not matter: the low end of its range.
_EPSILON = Param(
    "epsilon", "model", default=0.15,
    valid=ParameterRange(0.0, 0.5, why="della keeps entries with probability density +- epsilon"),
    search=(0.01, 0.09), alone="low", uniform="low",
)  # fmt: skip


def _spec(
    name: str,
    kind: TaskVectorKind,
    *,
    normalize: bool,
    rescale: bool,
    doc: str,
    extra: Param | None = None,
    density_gene: bool = True,
    parent_rank: int | None = None,
    uniform_rank: int | None = None,
) -> MethodSpec:
    density = Param(
        "density", "model", default=1.0, valid=_DENSITY_RANGE,
        # task_arithmetic accepts `density` but ignores it (as mergekit): no gene for it there.
        search=(0.1, 1.0) if density_gene else None, alone=1.0, uniform=1.0,
    )  # fmt: skip
    check = {None: None, "gamma": _check_gamma, "epsilon": _check_della}[extra.name if extra else None]
    return MethodSpec(
        name=name,
        params=(
            Param("int8_mask", "global", default=False),
            Param("normalize", "global", default=normalize),
            Param("rescale", "global", default=rescale),
            Param("lambda", "global", default=1.0, search=1.0, alone=1.0, uniform=1.0),
            WEIGHT,
            density,
            *((extra,) if extra else ()),
        ),
        base="required",
        min_models=1,  # a lone base is returned unchanged, as in mergekit
        max_models=None,
        random=kind.sparsifier in ("dare", "della"),
        doc=doc,
        merge=_merge_function(kind),
        writes_out=True,
        check=check,
        task_vector=kind,
        searchable=True,
        parent_rank=parent_rank,
        uniform_rank=uniform_rank,
    )


SPECS = (
    _spec(
        "task_arithmetic",
        TaskVectorKind(None, False),
        normalize=False,
        rescale=False,
        density_gene=False,
        parent_rank=0,
        uniform_rank=0,
        doc="base plus the weighted sum of task vectors (model - base)",
    ),
    _spec(
        "ties",
        TaskVectorKind("magnitude", True),
        normalize=True,
        rescale=False,
        parent_rank=2,
        uniform_rank=2,
        doc="TIES: trim task vectors to top-|x| density, elect signs, average the agreeing values",
    ),
    _spec(
        "dare_linear",
        TaskVectorKind("dare", False),
        normalize=False,
        rescale=True,
        parent_rank=3,
        uniform_rank=3,
        doc="DARE: randomly drop task-vector entries (keep prob. density), rescale, then add",
    ),
    _spec(
        "dare_ties",
        TaskVectorKind("dare", True),
        normalize=False,
        rescale=True,
        parent_rank=4,
        doc="DARE drop and rescale, then TIES sign election",
    ),
    _spec(
        "breadcrumbs",
        TaskVectorKind("breadcrumbs", False),
        normalize=False,
        rescale=False,
        extra=_GAMMA,
        doc="Model Breadcrumbs: drop the largest (gamma) and smallest task-vector entries, then add",
    ),
    _spec(
        "breadcrumbs_ties",
        TaskVectorKind("breadcrumbs", True),
        normalize=False,
        rescale=False,
        extra=_GAMMA,
        doc="Model Breadcrumbs sparsification, then TIES sign election",
    ),
    _spec(
        "della",
        TaskVectorKind("della", True),
        normalize=True,
        rescale=True,
        extra=_EPSILON,
        parent_rank=6,
        doc="DELLA: magnitude-ranked random drop, rescale, then TIES sign election",
    ),
    _spec(
        "della_linear",
        TaskVectorKind("della", False),
        normalize=False,
        rescale=True,
        extra=_EPSILON,
        parent_rank=5,
        doc="DELLA magnitude-ranked random drop and rescale, then add",
    ),
)
