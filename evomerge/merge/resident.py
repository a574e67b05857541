"""Resident sources and in-place candidates: a search trial costs a merge, not a reload.

`ResidentSources` reads every source tensor once, casts it to the math dtype and keeps it on the
math device (the GPU when there is one). `materialize` then writes each output tensor of a plan
straight into the parameters of one resident model object, which lm-eval scores as is. No file
is written or read per candidate.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from evomerge.errors import CompatibilityError, NonFiniteMergeError
from evomerge.io.hashing import checkpoint_hash, weights_hash
from evomerge.io.model_dir import ModelDir
from evomerge.merge.engine import all_finite, compute_recipe, default_workers, torch_threads
from evomerge.merge.fused_plan import merge_in_place
from evomerge.merge.methods import DeltaCache
from evomerge.merge.plan import MergePlan, TensorRecipe

__all__ = [
    "ResidentSources",
    "check_finite",
    "check_target",
    "checkpoint_hash",
    "load_into",
    "materialize",
    "target_parameters",
    "weights_hash",
]  # the hashes live in io/hashing.py; re-exported for callers of this module


# Below this many output entries a candidate is merged on one thread (pool hand-offs dominate).
_POOL_MIN_ENTRIES = 1 << 22


class ResidentSources:
    """Every tensor of every source model, loaded once, in `dtype` on `device`."""

    def __init__(
        self,
        models: Mapping[str, Path | ModelDir],
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        tensor_names: Iterable[str] | None = None,
        allow_pickle: bool = False,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        # Delta statistics (TIES cut histograms) of these never-changing tensors, kept across trials.
        self.delta_cache = DeltaCache()
        # Per recipe inputs: the fused kernel's view of them (fused_plan.resident_inputs).
        self.fused_inputs: dict = {}
        for name, model in models.items():
            model_dir = model if isinstance(model, ModelDir) else ModelDir(model, allow_pickle=allow_pickle)
            wanted = list(tensor_names) if tensor_names is not None else list(model_dir.tensors)
            self.tensors[name] = {
                tensor: model_dir.get(tensor).to(device=self.device, dtype=dtype) for tensor in wanted
            }
            model_dir.close()

    def get(self, model: str, tensor: str) -> torch.Tensor:
        return self.tensors[model][tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for model in self.tensors.values() for t in model.values())


def target_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a loaded model by checkpoint name: views into its parameters and buffers.

    transformers 5 renames and fuses checkpoint tensors when it loads a model (GPT-NeoX's
    `embed_out` is the module's `lm_head`; Mixtral's `experts.N.w1/w2/w3` are slices of fused
    `experts.gate_up_proj` / `down_proj`) and undoes that when it saves. Its own reversal
    (`revert_weight_conversion`, what `save_pretrained` runs) gives the checkpoint names; each
    checkpoint tensor is then a strided view into one module tensor, so a merge written into it
    lands in the model in place. A conversion that is no strided view is refused up front.
    """
    module_tensors = {name: tensor.data for name, tensor in model.state_dict(keep_vars=True).items()}
    checkpoint = _checkpoint_names(model, module_tensors)
    if checkpoint is None:
        return module_tensors
    storages = {tensor.untyped_storage().data_ptr() for tensor in module_tensors.values()}
    target = {}
    copies = []
    for name, tensor in checkpoint.items():
        if tensor.untyped_storage().data_ptr() in storages:
            target[name] = tensor
        else:
            copies.append(name)
    del checkpoint
    if copies:
        target.update(_fused_views(model, module_tensors, set(copies), set(target)))
    return target


# Per loaded model: checkpoint name -> (module tensor name, size, stride, offset in it); kept
# while the model lives, so a path export or a trial's hash does not redo transformers' reversal.
_GEOMETRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checkpoint_geometry(
    model: torch.nn.Module, module_names: Iterable[str]
) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...], int]]:
    """Where each checkpoint tensor sits inside the module tensors `module_names` (the names a
    module saves, tied copies left out): (module name, size, stride, storage offset in it)."""
    cached = _GEOMETRY.get(model)
    if cached is None:
        module_tensors = {name: tensor.data for name, tensor in model.state_dict(keep_vars=True).items()}
        owner = {}
        for name in module_names:
            owner.setdefault(module_tensors[name].untyped_storage().data_ptr(), name)
        cached = {}
        for checkpoint_name, view in target_parameters(model).items():
            module_name = owner.get(view.untyped_storage().data_ptr())
            if module_name is None or (checkpoint_name in module_tensors and checkpoint_name not in owner.values()):
                continue  # a tied copy, which the checkpoint leaves out
            offset = view.storage_offset() - module_tensors[module_name].storage_offset()
            cached[checkpoint_name] = (module_name, tuple(view.shape), tuple(view.stride()), offset)
        _GEOMETRY[model] = cached
    return cached


def _checkpoint_names(model: torch.nn.Module, module_tensors: dict[str, torch.Tensor]) -> dict | None:
    """transformers' save-time reversal of its load-time conversions (None: nothing to reverse)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversions: module names are checkpoint names
        return None
    if not hasattr(model, "config"):
        return None
    with torch.no_grad():
        return revert_weight_conversion(model, dict(module_tensors))


def _fused_views(
    model: torch.nn.Module, module_tensors: dict[str, torch.Tensor], wanted: set[str], named: set[str]
) -> dict[str, torch.Tensor]:
    """Views for checkpoint tensors the reversal copied out of a fused module tensor.

    Each module tensor the checkpoint does not name as it is (`named`: the names already mapped)
    goes through the same reversal once more as element indices (an arange of its shape): where
    every index lands gives the strides and offset of the checkpoint tensor inside it.
    """
    views: dict[str, torch.Tensor] = {}
    for module_name, tensor in module_tensors.items():
        if module_name in named or not wanted - views.keys():
            continue
        indices = torch.arange(tensor.numel(), dtype=torch.int64).view(tensor.shape)
        with torch.no_grad():
            reverted = _checkpoint_names(model, {module_name: indices}) or {}
        for name, placed in reverted.items():
            if name not in wanted:
                continue
            strided = _as_strided_view(placed, tensor.numel())
            if strided is None or not tensor.is_contiguous():
                raise CompatibilityError(
                    f"{name}: transformers stores it inside {module_name} in a way that is not a strided view; "
                    "this architecture cannot be merged in memory"
                )
            size, stride, offset = strided
            views[name] = tensor.as_strided(size, stride, tensor.storage_offset() + offset)
    missing = wanted - views.keys()
    if missing:
        raise CompatibilityError(
            f"the loaded model holds no parameter for the checkpoint tensor {sorted(missing)[0]}; "
            "this architecture cannot be merged in memory"
        )
    return views


def _as_strided_view(indices: torch.Tensor, numel: int) -> tuple[tuple[int, ...], tuple[int, ...], int] | None:
    """(size, stride, offset) such that arange(numel).as_strided(...) equals `indices`, or None."""
    if indices.numel() == 0:
        return None
    flat = indices.reshape(-1)
    offset = int(flat[0])
    stride = []
    for dim, size in enumerate(indices.shape):
        if size > 1:
            unit = [0] * indices.dim()
            unit[dim] = 1
            stride.append(int(indices[tuple(unit)]) - offset)
        else:
            stride.append(1)
    size = tuple(indices.shape)
    try:
        rebuilt = torch.arange(numel, dtype=torch.int64).as_strided(size, tuple(stride), offset)
    except RuntimeError:
        return None
    return (size, tuple(stride), offset) if torch.equal(rebuilt, indices) else None


def check_target(plan: MergePlan, target: Mapping[str, torch.Tensor]) -> None:
    """Fail early if the resident model cannot take the plan's tensors in place."""
    for recipe in plan.tensors:
        param = target.get(recipe.name)
        if param is None:
            raise CompatibilityError(
                f"the loaded model has no parameter named {recipe.name}: in-memory merging needs the "
                "checkpoint's tensor names to match the model's parameter names"
            )
        if tuple(param.shape) != tuple(recipe.shape):
            raise CompatibilityError(f"{recipe.name}: model parameter {tuple(param.shape)} vs plan {recipe.shape}")


def materialize(
    plan: MergePlan, sources: ResidentSources, target: Mapping[str, torch.Tensor], *, workers: int | None = None
) -> None:
    """Write every output tensor of `plan` into `target` in place (same values as a disk merge).

    On CPU, the tensors the fused kernel takes on its own (task arithmetic, TIES, ...) go into
    one kernel call (fused_plan.py), split over `workers` threads; the others are merged by
    `workers` threads with one torch thread each (as the disk engine does): the blocked kernels
    are single-threaded by design, and torch's own threading of 64K-entry ops waits on the other
    cores for longer than the op takes. Small plans run on one thread.
    """
    result_dtype = plan.math_dtype or sources.dtype
    options = {"math_dtype": plan.math_dtype, "seed": plan.seed, "cache": sources.delta_cache}

    @torch.no_grad()
    def merge_one(recipe: TensorRecipe) -> None:
        inputs = [sources.get(model, tensor) for model, tensor in recipe.inputs]
        destination = target[recipe.name].data
        if destination.dtype == result_dtype and destination.device == sources.device and destination.is_contiguous():
            # Straight into the parameter, block by block: no full-size temporary per tensor.
            compute_recipe(recipe, inputs, **options, out=destination)
        else:
            destination.copy_(compute_recipe(recipe, inputs, **options))

    if sources.device.type != "cpu":
        for recipe in plan.tensors:
            merge_one(recipe)
        return
    workers = workers or default_workers()
    if sum(math.prod(r.shape) for r in plan.tensors) < _POOL_MIN_ENTRIES:
        workers = 1  # a pool's hand-offs would cost more than the merge
    rest = merge_in_place(plan, sources, target, workers=workers)  # one fused-kernel batch
    if not rest:
        return
    with torch_threads(1):
        if workers == 1 or len(rest) <= 1:
            for recipe in rest:
                merge_one(recipe)
            return
        largest_first = sorted(rest, key=lambda r: math.prod(r.shape), reverse=True)  # balances the threads
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evomerge-remerge") as pool:
            for done in pool.map(merge_one, largest_first):
                del done  # re-raises the first failure


@torch.no_grad()
def load_into(target: Mapping[str, torch.Tensor], sources: ResidentSources, model: str) -> None:
    """Make the resident model an exact copy of one source model (for reference scores)."""
    for name, tensor in sources.tensors[model].items():
        if name in target:
            target[name].data.copy_(tensor)


def check_finite(target: Mapping[str, torch.Tensor], names: Iterable[str]) -> None:
    for name in names:
        if not all_finite(target[name]):
            raise NonFiniteMergeError(f"merged weights contain NaN or Inf (first in {name})")
