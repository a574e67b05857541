"""Merge methods: the tensor math of every mergekit method we support, one output tensor at a time.

Each method is a `MethodSpec` (registry.py: its typed parameters, how it uses the base model, how
many models it takes, its merge function), declared in its family's module (family/) and
registered in catalogue.py. `merge_tensors` validates the inputs (params.py) and dispatches.
Names, parameters, defaults and numerics follow mergekit, so a mergekit YAML recipe gives the
same weights here.

Conventions (as in mergekit):
* Math happens in the dtype of the inputs (bf16 in, bf16 sums), except `linear`, which
  accumulates in float32, and `slerp`, which works in float32 (both float64 for float64
  inputs, as mergekit 0.1.5); both cast back.
* Methods whose base is "unused" (linear, passthrough) treat every tensor alike: base_index is
  ignored and every source needs its per-model parameters (a base lists a `weight` too).
* Task-vector methods (task_arithmetic, ties, dare_*, breadcrumbs*, della*) share one pipeline:
  deltas vs the base -> per-model sparsify with its own density -> weight -> optional sign
  consensus -> optional normalisation -> lambda -> base + mixed.
* Scalar factors that come from reductions (L1 norms, dot products, cosines) are computed in
  float64, so results do not depend on the thread count.
* Random methods (dare_*, della*) draw from a generator per (seed, model index), never from the
  global RNG: the same seed gives the same bits whatever the order tensors are merged in.
* linear, slerp and the task-vector methods evaluate block by block (`blocks.py`): whole-tensor
  statistics first (norms, cuts, masks), then the elementwise chain per cache-sized block, with
  the same ops in the same order, so the bits equal whole-tensor evaluation.
* On CPU the task-vector methods run as one fused C loop when a C compiler is at hand
  (`native.py`, `fused.c`; EVOMERGE_NATIVE=0 turns it off), bit-identical to the eager chain:
  TIES cuts come from |delta| histograms (kept across trials for resident sources) and the
  entries inside the cut's bucket are settled exactly. tests/test_native.py holds the two together.

Differences from mergekit (deliberate; each is also commented where it happens):
1. breadcrumbs with int(gamma * numel) == 0 keeps the top int(density * numel) magnitudes.
   mergekit 0.1.4 zeroed the whole delta (negative-zero slice bound); 0.1.5 agrees with us.
2. ties/magnitude with int(density * numel) == 0 (density > 0) keeps the largest entry, as
   mergekit 0.1.5 does; 0.1.4 asserted (a crash in the middle of a merge or a search).
3. linear with normalize and |sum of weights| < 1e-8 divides by 1 (the rule the task-vector
   methods use) instead of by ~0, which gives inf/NaN in mergekit.
4. della rows of length 1 keep with probability `density` (mergekit fails on a NaN
   probability), and della keep probabilities stay float32 for bf16 deltas. See `sparsify.py`.
5. Masks come from our own seeded generators, so dare/della masks differ from mergekit's
   (which draw from the global RNG); their distribution and everything else is the same.
6. Sums over the models add in model order into a float32 accumulator (`family.common.model_sum`). That is
   torch.sum(dim=0), mergekit's, for up to 4 models; with 5+ models torch adds the last columns
   of a tensor in another order, so those entries can differ from mergekit in the last bit.
   A fixed order of our own keeps weight hashes independent of torch's reduction internals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from evomerge.merge import catalogue as _catalogue  # noqa: F401  (registers the built-in methods)
from evomerge.merge import sparsify
from evomerge.merge.delta_cache import DeltaCache
from evomerge.merge.fused_dispatch import FusedMerge, fused_merge
from evomerge.merge.params import (
    check_inputs,
    check_method_params,
    check_parameters,
    resolve_globals,
    resolve_model_params,
)
from evomerge.merge.registry import METHODS, MethodSpec, Param, get_method

__all__ = [
    "METHODS",
    "DeltaCache",
    "FusedMerge",
    "MethodSpec",
    "Param",
    "check_parameters",
    "fused_merge",
    "get_method",
    "merge_tensors",
]


# -- entry point -----------------------------------------------------------------------------------
def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, Any],
    base_index: int | None,
    seed: int | None = None,
    out: torch.Tensor | None = None,
    cache: DeltaCache | None = None,
    cache_keys: Sequence[Any] | None = None,
    statistics: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Merge one output tensor from its source tensors (one per source model, config order).

    Inputs share shape and device; they are cast to the dtype of the base (or of the first
    tensor when no base takes part), which is also the dtype of the result. Missing parameters
    take the method's defaults. `seed` makes random methods reproducible (None means 0); the
    caller derives it per tensor. The result never aliases an input. Bad inputs raise ValueError.
    `out` (contiguous, the result's shape and dtype, aliasing no input) receives the result
    without a full-size temporary: how a search re-merges into a resident model.
    `cache` keeps statistics of the deltas between inputs that never change across calls (resident
    sources), under `cache_keys` (one hashable per tensor naming its content, e.g. (model, name)).
    `statistics` (data methods only: one per tensor, None where a model has none for it) are the
    per-model statistics the method weighs by (evomerge.data_stats).
    """
    spec = get_method(method)
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{spec.name} needs at least one tensor, got none")
    base_index = check_inputs(spec, tensors, base_index)
    options = resolve_globals(spec, global_params or {})
    resolved = resolve_model_params(spec, list(model_params), len(tensors), base_index)
    check_method_params(spec, resolved, options, base_index)
    dtype = tensors[base_index if base_index is not None else 0].dtype
    tensors = [tensor.to(dtype) for tensor in tensors]
    if out is not None and (out.shape != tensors[0].shape or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"{spec.name}: out must be a contiguous {dtype} tensor of shape {tuple(tensors[0].shape)}")
    seed = 0 if seed is None else seed
    if spec.statistic is not None:
        if statistics is None:
            raise ValueError(f"{spec.name} needs per-model statistics from data (a 'data:' section)")
        if len(statistics) != len(tensors):
            raise ValueError(f"{spec.name}: {len(statistics)} statistics for {len(tensors)} tensors")
        with torch.no_grad():
            merged = spec.merge(tensors, resolved, options, base_index, seed, statistics=list(statistics))
        return merged if out is None else out.copy_(merged)
    with torch.no_grad():
        if spec.task_vector is not None and cache is not None and cache_keys is not None:
            keys = list(cache_keys)

            def histogram(index: int, compute: Callable[[], torch.Tensor]) -> sparsify.KeyHistogram:
                return cache.histogram(DeltaCache.key(keys[index], keys[base_index], dtype), compute)

            return spec.merge(tensors, resolved, options, base_index, seed, out=out, histogram=histogram)
        if spec.writes_out:
            return spec.merge(tensors, resolved, options, base_index, seed, out=out)
        merged = spec.merge(tensors, resolved, options, base_index, seed)
        return merged if out is None else out.copy_(merged)
