"""The task-vector methods' way into the fused C kernel (native.py, fused.c).

`fused_merge` turns a method and its parameters into the kernel's settings once (`FusedMerge`),
so a plan of many tensors (fused_plan.py) validates and converts them once; `native_task_vectors`
runs one tensor through the kernel, bit-identical to the eager chain of family/task_vectors.py:
TIES cuts come from |delta| histograms (cached across trials for resident sources), the kernel
settles the entries inside a cut's bucket exactly, and the other sparsifiers hand it their masks.
"""

from __future__ import annotations

import array
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.merge import blocks, native
from evomerge.merge.params import check_method_params, resolve_globals, resolve_model_params
from evomerge.merge.registry import METHODS
from evomerge.merge.trim import TaskVectorKind, mix_weights, plan_trim, top_k, trivial_trim


@dataclass
class FusedMerge:
    """The tensor-independent part of a task-vector merge in the fused kernel's terms: validated
    once, then shared by every tensor a plan merges with the same method and parameters."""

    kind: TaskVectorKind
    densities: list[float]  # per source model (the base excluded), config order
    weights: list[float]  # rounded to the math dtype
    normalize: bool
    divisor: float  # the normaliser without consensus; 1.0 otherwise
    lam: float
    _trims: dict[int, tuple[list[int], list[int], array.array]] = field(default_factory=dict)

    @functools.cached_property
    def flags(self) -> tuple[int, int]:
        return int(self.kind.consensus), int(self.normalize)

    @functools.cached_property
    def reals(self) -> array.array:
        """The job's float slots (native.merge_reals), without masks to rescale."""
        return native.merge_reals(self.divisor, self.lam, self.weights, None)

    def trims(self, count: int) -> tuple[list[int], list[int], array.array]:
        """Per model the kernel mode for a tensor of `count` entries and the TIES top-k (CUT),
        and both as the job's trim slots. KEEP and ZERO are decided without the data; MASK means
        a mask must be made first."""
        found = self._trims.get(count)
        if found is None:
            modes, ks = [], []
            for density in self.densities:
                trim = trivial_trim(self.kind.sparsifier, density, count)
                if trim is not None:
                    modes.append(native.ZERO if trim.zero else native.KEEP)
                    ks.append(0)
                elif self.kind.sparsifier == "magnitude":
                    modes.append(native.CUT)
                    ks.append(top_k(density, count))
                else:
                    modes.append(native.MASK)
                    ks.append(0)
            found = self._trims[count] = (modes, ks, native.trim_slots(modes, ks))
        return found


def _fused_merge(kind, model_params, options, sources, dtype, device) -> FusedMerge:
    weights, divisor = mix_weights(kind, sources, model_params, options, dtype, device)
    return FusedMerge(
        kind=kind,
        densities=[model_params[i]["density"] for i in sources],
        weights=weights.reshape(-1).float().tolist(),
        normalize=options["normalize"],
        divisor=float(divisor) if divisor is not None else 1.0,
        lam=options["lambda"],
    )


def fused_merge(
    method: str,
    model_params: Sequence[Mapping[str, Any]],
    global_params: Mapping[str, Any],
    base_index: int | None,
    dtype: torch.dtype,
) -> FusedMerge | None:
    """The fused kernel's settings for merging tensors of `dtype` with these parameters: a
    task-vector method (not a rescaled TIES), a base and at least one other model; None
    otherwise. Bad parameters raise the ValueError merge_tensors raises. The caller checks the
    tensors as merge_tensors does, and leaves to it every tensor whose `trims` ask for a mask
    (drawn or computed per tensor in Python)."""
    spec = METHODS.get(method)
    kind = spec.task_vector if spec is not None else None
    count = len(model_params)
    if kind is None or base_index is None or not 0 <= base_index < count or count < 2:
        return None
    options = resolve_globals(spec, global_params or {})
    resolved = resolve_model_params(spec, list(model_params), count, base_index)
    check_method_params(spec, resolved, options, base_index)
    if not native_eligible(kind, options, dtype, "cpu"):
        return None
    sources = [index for index in range(count) if index != base_index]
    return _fused_merge(kind, resolved, options, sources, dtype, "cpu")


def native_eligible(kind: TaskVectorKind, options, dtype: torch.dtype, device_type: str) -> bool:
    # A rescaled TIES trim needs the kept L1 norm before the fused pass: eager path.
    return not (kind.sparsifier == "magnitude" and options["rescale"]) and native.supports(dtype, device_type)


def native_task_vectors(kind, tensors, model_params, options, base_index, seed, target, histogram):
    """The fused C kernel (native.py) over the whole tensor, in one call: TIES cuts come from
    |delta| histograms (cached for resident sources), the kernel settles the entries inside each
    cut's bucket exactly itself, and the other sparsifiers hand it their masks."""
    base = tensors[base_index]
    sources = [index for index in range(len(tensors)) if index != base_index]
    settings = _fused_merge(kind, model_params, options, sources, base.dtype, base.device)
    flat_base = blocks.flat(base)
    count = flat_base.numel()
    modes, ks, _ = settings.trims(count)
    flat_sources, masks, factors, histograms = [], [], [], []
    for row, index in enumerate(sources):
        flat = blocks.flat(tensors[index])
        flat_sources.append(flat)
        mask, factor, cut = None, None, None
        if modes[row] == native.CUT:
            cut = histogram(index, lambda s=flat: native.key_histogram(flat_base, s))
        elif modes[row] == native.MASK:
            params = model_params[index]
            trim = plan_trim(kind.sparsifier, tensors[index], base, params, options["rescale"], seed, index)
            mask, factor = trim.mask, trim.factor
        masks.append(mask)
        factors.append(1.0 if factor is None else factor)  # x * 1.0 == x, bit for bit
        histograms.append(cut)
    batch = native.JobBatch()
    batch.add(
        base.dtype, count, flat_base.data_ptr(), target.data_ptr(), [s.data_ptr() for s in flat_sources],
        settings.weights, modes, ks, masks=[0 if m is None else m.data_ptr() for m in masks], factors=factors,
        histograms=[field for h in histograms for field in (h.raw if h is not None else (0,) * 6)],
        consensus=kind.consensus, normalize=settings.normalize, divisor=settings.divisor, lam=settings.lam,
    )  # fmt: skip
    batch.run()
