"""Resident sources and in-place candidates: a search trial costs a merge, not a reload.

`ResidentSources` reads every source tensor once, casts it to the math dtype and keeps it on the
math device (the GPU when there is one). `materialize` then writes each output tensor of a plan
straight into the parameters of one resident model object, which lm-eval scores as is. No file
is written or read per candidate.

A LoRA adapter source keeps its base's tensors (shared with the base model when that is a source
too) and, with `adapters="factors"`, only its A and B factors: each tensor it adapts is computed
(base + scale * B @ A) when a candidate reads it. `adapters="cached"` computes them once at load,
a full tensor per adapted tensor (benchmarks/lora_bench.py measures the memory and time of both).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from evomerge.errors import CompatibilityError, NonFiniteMergeError
from evomerge.io.hashing import checkpoint_hash, weights_hash
from evomerge.io.lora import AdapterModel, LoraFactors, apply_delta, open_model
from evomerge.io.model_dir import ModelDir
from evomerge.merge.engine import all_finite, compute_recipe, default_workers, torch_threads
from evomerge.merge.fused_plan import merge_in_place
from evomerge.merge.methods import DeltaCache
from evomerge.merge.plan import MergePlan, TensorRecipe
from evomerge.merge.vocab import Vocabulary

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
        models: Mapping[str, Path | ModelDir | AdapterModel],
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        tensor_names: Iterable[str] | None = None,
        allow_pickle: bool = False,
        vocab: Vocabulary | None = None,
        vocab_base: str | None = None,
        adapters: Literal["factors", "cached"] = "factors",
    ):
        self.device = torch.device(device)
        # Differing vocabularies: the output vocabulary, and the permuted embedding and head
        # inputs, kept per (tensor, model set, base) under names of their own (aligned_plan).
        self.vocab = vocab
        self.vocab_base = vocab_base
        self._aligned: dict[tuple, tuple[tuple[str, str], ...]] = {}
        self.dtype = dtype
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        # Per LoRA source, the tensors computed when read: name -> (factors on the device, stored dtype).
        self.factors: dict[str, dict[str, tuple[LoraFactors, torch.dtype]]] = {}
        # Delta statistics (TIES cut histograms) of these never-changing tensors, kept across trials.
        self.delta_cache = DeltaCache()
        # Per recipe inputs: the fused kernel's view of them (fused_plan.resident_inputs).
        self.fused_inputs: dict = {}
        # Data methods' statistics (evomerge.data_stats), by statistics file: tensor name -> float32
        # tensor on the device, read on a plan's first use and kept for every later trial.
        self.statistics: dict[Path, dict[str, torch.Tensor]] = {}
        folders: dict[Path, dict[str, torch.Tensor]] = {}  # one resident copy per checkpoint folder
        for name, model in models.items():
            opened = (
                model if isinstance(model, (ModelDir, AdapterModel)) else open_model(model, allow_pickle=allow_pickle)
            )
            base = opened.base if isinstance(opened, AdapterModel) else opened
            wanted = list(tensor_names) if tensor_names is not None else list(opened.tensors)
            loaded = folders.setdefault(base.path.resolve(), {})
            for tensor in wanted:
                if tensor not in loaded:
                    loaded[tensor] = base.get(tensor).to(device=self.device, dtype=dtype)
            self.tensors[name] = {tensor: loaded[tensor] for tensor in wanted}
            if isinstance(opened, AdapterModel):
                self._add_adapter(name, opened, wanted, cached=adapters == "cached")
            opened.close()

    def _add_adapter(self, name: str, model: AdapterModel, wanted: list[str], *, cached: bool) -> None:
        """An adapter's saved tensors replace its base's; its adapted ones are computed now or when read."""
        for tensor, replacement in model.adapter.replacements.items():
            if tensor in self.tensors[name]:
                self.tensors[name][tensor] = replacement.to(device=self.device, dtype=self.dtype)
        adapted = {}
        for tensor, factors in model.adapter.factors.items():
            if tensor in self.tensors[name]:
                adapted[tensor] = (factors.to(self.device), model.base.tensors[tensor].dtype)
        self.factors[name] = adapted
        if cached:
            for tensor in adapted:
                self.tensors[name][tensor] = self._adapted(name, tensor)
            self.factors[name] = {}

    def _adapted(self, model: str, tensor: str) -> torch.Tensor:
        """Base + delta rounded to the base's stored dtype, then the math dtype: the value a disk
        merge reads from AdapterModel.get, whatever the math dtype."""
        factors, stored = self.factors[model][tensor]
        return apply_delta(self.tensors[model][tensor], factors.delta()).to(stored).to(self.dtype)

    def get(self, model: str, tensor: str) -> torch.Tensor:
        if tensor in self.factors.get(model, ()):
            return self._adapted(model, tensor)
        return self.tensors[model][tensor]

    def aligned_plan(self, plan: MergePlan) -> MergePlan:
        """`plan` reading resident, already permuted inputs for its embeddings and head.

        Each model set's permutation (merge/vocab.py; its fill rules depend on the set) is computed
        on first use and kept, so a search permutes once, not per trial; the fused kernel and the
        delta cache then see plain resident tensors."""
        vocab = plan.vocab
        if vocab is None or not vocab.tensors:
            return plan
        recipes = []
        for recipe in plan.tensors:
            if recipe.name not in vocab.tensors:
                recipes.append(recipe)
                continue
            base = vocab.tensors[recipe.name]
            key = (recipe.inputs, base)
            if key not in self._aligned:
                models = [model for model, _ in recipe.inputs]
                aligned = vocab.align(models, [self.get(m, t) for m, t in recipe.inputs], base)
                names = []
                for (model, name), tensor in zip(recipe.inputs, aligned):
                    alias = f"{name}@vocab[{','.join(models)}|{base}]"
                    self.tensors[model][alias] = tensor.to(device=self.device, dtype=self.dtype)
                    names.append((model, alias))
                self._aligned[key] = tuple(names)
            recipes.append(replace(recipe, inputs=self._aligned[key]))
        return replace(plan, tensors=tuple(recipes), vocab=None)

    def recipe_statistics(self, plan: MergePlan, recipe: TensorRecipe) -> list[torch.Tensor | None] | None:
        """The resident statistics of a data method's recipe (None for other methods); each of
        the plan's statistics files is read once, on first use."""
        from evomerge.merge.registry import get_method

        if get_method(recipe.method).statistic is None:
            return None
        found: list[torch.Tensor | None] = []
        for index, (model, tensor) in enumerate(recipe.inputs):
            path = plan.statistics.get(model)
            if path is None or index == recipe.base_index:
                found.append(None)
                continue
            if path not in self.statistics:
                from safetensors.torch import load_file

                self.statistics[path] = {
                    name: value.to(device=self.device, dtype=torch.float32) for name, value in load_file(path).items()
                }
            found.append(self.statistics[path].get(tensor))
        return found

    def computed_when_read(self, model: str, tensor: str) -> bool:
        """A fresh tensor on every read (an adapter's, kept as factors): not to be held across trials."""
        return tensor in self.factors.get(model, ())

    def names(self, model: str) -> list[str]:
        return list(self.tensors[model])

    @property
    def nbytes(self) -> int:
        """Resident bytes: each shared tensor once, plus the adapters' factors."""
        unique = {t.data_ptr(): t.numel() * t.element_size() for model in self.tensors.values() for t in model.values()}
        factors = sum(f.nbytes for adapted in self.factors.values() for f, _ in adapted.values())
        return sum(unique.values()) + factors


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
    plan = sources.aligned_plan(plan)
    result_dtype = plan.math_dtype or sources.dtype
    options = {"math_dtype": plan.math_dtype, "seed": plan.seed, "cache": sources.delta_cache}
    # Looked up before any thread starts: the first trial reads the statistics files once.
    statistics_of = {recipe.name: sources.recipe_statistics(plan, recipe) for recipe in plan.tensors}

    @torch.no_grad()
    def merge_one(recipe: TensorRecipe) -> None:
        inputs = [sources.get(model, tensor) for model, tensor in recipe.inputs]
        destination = target[recipe.name].data
        statistics = statistics_of[recipe.name]
        if destination.dtype == result_dtype and destination.device == sources.device and destination.is_contiguous():
            # Straight into the parameter, block by block: no full-size temporary per tensor.
            compute_recipe(recipe, inputs, **options, out=destination, statistics=statistics)
        else:
            destination.copy_(compute_recipe(recipe, inputs, **options, statistics=statistics))

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
    """Make the resident model an exact copy of one source model (for reference scores). With an
    output vocabulary its embedding and head rows are permuted into it (filled as a merge of all
    the sources would fill them)."""
    names = list(sources.tensors)
    for name in sources.names(model):
        if name not in target:  # the permuted inputs' aliases (aligned_plan) are not parameters
            continue
        tensor = sources.get(model, name)
        if target[name].shape != tensor.shape and sources.vocab is not None:
            tensors = [sources.get(m, name) for m in names]
            tensor = sources.vocab.align(names, tensors, sources.vocab_base)[names.index(model)]
        target[name].data.copy_(tensor)


def check_finite(target: Mapping[str, torch.Tensor], names: Iterable[str]) -> None:
    for name in names:
        if not all_finite(target[name]):
            raise NonFiniteMergeError(f"merged weights contain NaN or Inf (first in {name})")
