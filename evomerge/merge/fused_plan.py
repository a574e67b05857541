"""A re-merge's task-vector tensors in one fused-kernel call (native.JobBatch).

Through merge_tensors, every tensor pays a fixed Python cost (parameter validation, casts, one
ctypes call with its argument arrays): more than the merge itself for a small model. Here a plan's parameters are
validated once per distinct (method, parameters), the pointers and |delta| histograms of the
resident sources are looked up once per search, and every tensor the kernel takes on its own
goes into one batch. The bits are merge_tensors' (the same kernel on the same inputs).
"""

from __future__ import annotations

import array
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from evomerge.merge import native
from evomerge.merge.methods import DeltaCache, FusedMerge, fused_merge
from evomerge.merge.plan import MergePlan, TensorRecipe
from evomerge.merge.sparsify import KeyHistogram

if TYPE_CHECKING:
    from evomerge.merge.resident import ResidentSources


@dataclass
class ResidentInputs:
    """One recipe's resident tensors as the kernel reads them; fixed for the life of a search."""

    dtype: torch.dtype
    shape: torch.Size
    count: int
    base: torch.Tensor
    sources: list[torch.Tensor]  # the base excluded, config order
    prefix: tuple[int, ...]  # native.job_prefix
    addresses: list[int]  # of `sources`
    keys: list[Any]  # DeltaCache keys of each source's |delta| histogram (merge_tensors' keys)
    histograms: array.array  # each source's KeyHistogram.raw (6 fields), once known; zeros before
    held: list[KeyHistogram | None]  # those histograms, kept alive while their addresses are used

    def fill_histogram(self, row: int, resident: ResidentSources) -> None:
        base, source = self.base, self.sources[row]
        found = resident.delta_cache.histogram(self.keys[row], lambda: native.key_histogram(base, source))
        self.histograms[6 * row : 6 * row + 6] = array.array("q", found.raw)
        self.held[row] = found


def resident_inputs(
    recipe: TensorRecipe, resident: ResidentSources, math_dtype: torch.dtype | None
) -> ResidentInputs | None:
    """The kernel's view of a recipe's inputs, or None when merge_tensors must take it (tensors
    it would cast or reject, no base, nothing to merge). Cached on `resident`."""
    key = (recipe.inputs, recipe.base_index, math_dtype)
    cache = resident.fused_inputs
    if key in cache:
        return cache[key]
    if any(resident.computed_when_read(model, name) for model, name in recipe.inputs):
        cache[key] = None  # a LoRA delta computed per read: merged by merge_tensors, never pinned here
        return None
    tensors = [resident.get(model, name) for model, name in recipe.inputs]
    base_index, found = recipe.base_index, None
    if base_index is not None and 0 <= base_index < len(tensors) and len(tensors) > 1:
        base = tensors[base_index]
        dtype = math_dtype or base.dtype
        if (
            base.numel() > 0
            and dtype in native.DTYPE_CODES
            and all(
                t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() and t.shape == base.shape
                for t in tensors
            )
        ):
            rows = [index for index in range(len(tensors)) if index != base_index]
            sources = [tensors[index] for index in rows]
            found = ResidentInputs(
                dtype=dtype,
                shape=base.shape,
                count=base.numel(),
                base=base,
                sources=sources,
                prefix=native.job_prefix(dtype, base.numel(), len(sources), base.data_ptr()),
                addresses=[s.data_ptr() for s in sources],
                keys=[DeltaCache.key(recipe.inputs[i], recipe.inputs[base_index], dtype) for i in rows],
                histograms=array.array("q", bytes(6 * 8 * len(rows))),
                held=[None] * len(rows),
            )
    cache[key] = found
    return found


def _settings_key(recipe: TensorRecipe, dtype: torch.dtype):
    try:
        models = tuple(tuple(params.items()) for params in recipe.model_params)  # same order: same key
        key = (recipe.method, recipe.base_index, dtype, models, tuple(recipe.global_params.items()))
        hash(key)
    except TypeError:  # an unhashable parameter value: validated per tensor instead
        return None
    return key


def merge_in_place(
    plan: MergePlan, resident: ResidentSources, target: Mapping[str, torch.Tensor], *, workers: int = 1
) -> list[TensorRecipe]:
    """Merge every recipe of `plan` the fused kernel takes on its own into `target` (in place,
    one batch on up to `workers` threads); return the others, for merge_tensors. Parameters are
    validated as merge_tensors validates them, with the same errors."""
    if resident.device.type != "cpu" or native.library() is None:
        return list(plan.tensors)
    settings: dict[Any, FusedMerge | None] = {}
    batch = native.JobBatch()
    rest: list[TensorRecipe] = []
    waiting: list[tuple[TensorRecipe, ResidentInputs, FusedMerge, array.array, int]] = []  # on histograms
    missing: list[tuple[ResidentInputs, int]] = []
    for recipe in plan.tensors:
        inputs = resident_inputs(recipe, resident, plan.math_dtype)
        merge = None
        if inputs is not None:
            # Recipes of one gene set share their parameter objects (Genome.plan): those are
            # alive for this whole call, so their ids key the cache before their values do.
            same = (id(recipe.model_params), id(recipe.global_params), recipe.method, recipe.base_index, inputs.dtype)
            if same in settings:
                merge = settings[same]
            else:
                key = _settings_key(recipe, inputs.dtype)
                if key is None or key not in settings:
                    merge = fused_merge(
                        recipe.method, recipe.model_params, recipe.global_params, recipe.base_index, inputs.dtype
                    )
                    if key is not None:
                        settings[key] = merge
                else:
                    merge = settings[key]
                settings[same] = merge
        out = target[recipe.name]
        if merge is None or not (
            out.dtype == inputs.dtype and out.device.type == "cpu" and out.is_contiguous() and out.shape == inputs.shape
        ):
            rest.append(recipe)
            continue
        modes, _, trims = merge.trims(inputs.count)
        if native.MASK in modes:  # DARE, DELLA, breadcrumbs: a mask to make per tensor first
            rest.append(recipe)
            continue
        if None in inputs.held:
            unknown = [
                (inputs, row) for row, mode in enumerate(modes) if mode == native.CUT and inputs.held[row] is None
            ]
            if unknown:
                missing += unknown
                waiting.append((recipe, inputs, merge, trims, out.data_ptr()))
                continue
        _queue(batch, recipe, inputs, merge, trims, out.data_ptr())
    if len(missing) > 1 and workers > 1:  # a search's first trial: one pass over each delta
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evomerge-histogram") as pool:
            list(pool.map(lambda item: item[0].fill_histogram(item[1], resident), missing))
    else:
        for inputs, row in missing:
            inputs.fill_histogram(row, resident)
    for job in waiting:
        _queue(batch, *job)
    if len(batch):
        batch.run(workers)
    return rest


def _queue(batch: native.JobBatch, recipe, inputs: ResidentInputs, merge: FusedMerge, trims, out: int) -> None:
    ints = (inputs.prefix, (*merge.flags, out), inputs.addresses, trims, inputs.histograms)
    batch.add_slots(inputs.count, ints, merge.reals, recipe.name)
