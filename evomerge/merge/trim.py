"""How a task vector is sparsified: the whole-tensor first pass of the task-vector methods.

`plan_trim` decides per model what its sparsifier keeps (a mask, a TIES magnitude cut, all or
nothing) and the L1 rescale factor, from whole-tensor statistics; `Trim.apply` then trims one
block of the delta at a time. Both the eager chain (family/task_vectors.py) and the fused C
kernel's dispatch (fused_dispatch.py) plan trims here, so they keep the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from evomerge.merge import blocks, sparsify

# None (task_arithmetic: keep all), TIES magnitude top-k, breadcrumbs, DARE or DELLA drops.
Sparsifier = Literal["magnitude", "breadcrumbs", "dare", "della"] | None


@dataclass(frozen=True)
class TaskVectorKind:
    """What distinguishes one task-vector method from another in the shared pipeline."""

    sparsifier: Sparsifier
    consensus: bool  # TIES sign election by weighted mass


# Below this many entries a TIES cut comes from torch.kthvalue on the whole tensor: the radix
# histograms' fixed cost (65536 buckets) is larger than the selection itself.
RADIX_MIN = 1 << 18


@dataclass
class Trim:
    """How one task vector is sparsified, decided from whole-tensor statistics (first pass) and
    applied block by block (second pass)."""

    zero: bool = False  # the whole delta becomes 0
    mask: torch.Tensor | None = None  # flat bool over the whole tensor: keep where True
    cut: sparsify.MagnitudeCut | None = None  # keep by |delta| threshold (TIES), in block order
    factor: float | None = None  # L1 rescale of the kept entries

    def apply(self, delta: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Trim one block of the delta in place: delta * mask [* factor], as the sparsifiers do."""
        if self.zero:
            return delta.zero_()
        if self.mask is not None:
            delta.mul_(self.mask[start:stop])
        elif self.cut is not None:
            delta.mul_(self.cut.mask(delta.abs().to(torch.float32)))
        else:
            return delta
        return delta.mul_(self.factor) if self.factor is not None else delta


def rescale_factor(trim: Trim, delta_blocks) -> float | None:
    """sparsify.rescale_factor of the float64 L1 norms, summed block by block."""
    before = after = 0.0
    if trim.cut is not None:
        trim.cut.restart()
    for delta, start, stop in delta_blocks():
        before += float(delta.abs().to(torch.float64).sum())
        after += float(trim.apply(delta, start, stop).abs().to(torch.float64).sum())
    if trim.cut is not None:
        trim.cut.restart()
    return sparsify.rescale_factor(before, after)


def top_k(density: float, count: int) -> int:
    """How many entries a TIES trim keeps: at least one (mergekit 0.1.4 asserted on k == 0)."""
    return max(1, int(density * count))


def trivial_trim(kind: Sparsifier, density: float, count: int) -> Trim | None:
    """The trims decided without looking at the data (keep all, zero all); None otherwise."""
    if kind is None:
        return Trim()  # task_arithmetic accepts `density` but ignores it, as in mergekit
    if density >= 1 or count == 0 or (kind == "magnitude" and top_k(density, count) >= count):
        return Trim()  # delta * 1 (* 1.0): unchanged
    if density <= 0 and kind != "breadcrumbs":  # breadcrumbs keeps signed zeros (delta * 0)
        return Trim(zero=True)
    return None


def plan_trim(kind: Sparsifier, source: torch.Tensor, base: torch.Tensor, params, rescale, seed, index) -> Trim:
    """Pass 1 for one model: what its sparsifier keeps, and the rescale factor."""
    count = base.numel()
    trivial = trivial_trim(kind, params["density"], count)
    if trivial is not None:
        return trivial
    density = params["density"]
    shape = source.shape
    source, base = blocks.flat(source), blocks.flat(base)

    def delta_blocks():
        for start, stop in blocks.blocks(count, base.device):
            yield source[start:stop] - base[start:stop], start, stop

    if kind == "magnitude" and base.dtype != torch.float64 and count >= RADIX_MIN:
        k = top_k(density, count)
        keys = lambda: (delta.abs().to(torch.float32) for delta, _, _ in delta_blocks())  # noqa: E731
        cut, greater, tied = sparsify.top_k_cut(keys, k, single_level=base.dtype == torch.bfloat16)
        trim = Trim(cut=sparsify.MagnitudeCut(cut, greater, tied, k))
    elif kind == "dare" and base.device.type == "cpu":
        generator = sparsify.make_generator(seed, index, base.device)
        spans = blocks.blocks(count, base.device)
        trim = Trim(mask=sparsify.dare_mask_blocks(count, density, generator, base.device, spans))
    else:  # whole-tensor masks: small or float64 TIES, breadcrumbs, DARE on accelerators, DELLA
        delta = (source - base).reshape(-1)
        if kind == "magnitude":
            mask = sparsify.magnitude_mask(delta, density)
        elif kind == "breadcrumbs":
            mask = sparsify.breadcrumbs_mask(delta, density, params["gamma"])
        else:
            generator = sparsify.make_generator(seed, index, base.device)
            if kind == "dare":
                mask = sparsify.dare_mask(delta, density, generator)
            else:
                sparsify.check_della(density, params["epsilon"])
                mask = sparsify.della_mask(delta.reshape(shape), density, params["epsilon"], generator)
        del delta
        trim = Trim(mask=mask.reshape(-1))
    if rescale:
        trim.factor = rescale_factor(trim, delta_blocks)
    return trim


def mix_weights(kind: TaskVectorKind, sources, model_params, options, dtype, device):
    """The models' weights as a column in the math dtype (bf16-rounded for bf16 merges, like
    mergekit), and the normaliser of a merge without sign consensus (None when not normalised)."""
    weights = torch.tensor([model_params[i]["weight"] for i in sources], dtype=dtype, device=device).reshape(-1, 1)
    divisor = None
    if options["normalize"] and not kind.consensus:
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    return weights, divisor
