"""Sparsifiers: which entries of a task vector (delta = model - base) survive a merge.

Pure functions, one per mergekit sparsification method, composed by `trim.py`:

* `magnitude`   (ties): keep the k = int(density * numel) largest |delta| of the whole tensor.
* `breadcrumbs` (breadcrumbs*): drop the int(gamma * numel) largest |delta| as outliers, then
  the smallest, keeping a band of int(density * numel) entries.
* `dare`        (dare_*): keep each entry with probability `density` (Bernoulli mask).
* `della`       (della*): keep each entry with a probability that grows with the rank of its
  magnitude within its row, from density - epsilon to density + epsilon.

With `rescale`, the kept entries are multiplied by ||delta||_1 / ||kept||_1, the L1 mass
actually removed (mergekit's "generic sparsification rescaling"), not by 1/density as in the
DARE paper. Every sparsifier returns its input unchanged when density >= 1.

Determinism: the random masks come from `torch.rand(..., generator=g) < p` with a generator
seeded by `seeds.model_seed(seed, model_index)`, so a mask is a pure function of (seed, model index,
shape, device type) and never of the global RNG, call order or thread count. Reductions that
decide scalar factors (the L1 norms) accumulate in float64 for the same reason.

Equal magnitudes at a cut (common in bf16) are kept in position order, the choice a stable
sort makes; mergekit's unstable argsort keeps an implementation-defined subset of them, and
only those entries can differ. Selection is O(n): a radix histogram of the key bit patterns for
large TIES tensors (`top_k_cut`, block by block), `torch.kthvalue` otherwise.

Differences from mergekit (0.1.5, and the 0.1.4 notes in the research file):
* `magnitude` with 0 < density and int(density * numel) == 0 keeps the single largest entry,
  as mergekit 0.1.5 does (0.1.4 asserted, a crash mid-merge).
* `breadcrumbs` with int(gamma * numel) == 0 keeps the top int(density * numel) magnitudes (no
  outliers removed). mergekit 0.1.4 zeroed the whole delta through a negative-zero slice bound;
  0.1.5 behaves as we do.
* `della` on rows of length 1 (rank normalisation is 0/0) keeps with probability `density`;
  mergekit raises inside torch.bernoulli (NaN probability). Keep probabilities are computed in
  float32 even for bf16 deltas (mergekit rounds ranks and probabilities to bf16).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.merge.family.common import sum64
from evomerge.merge.seeds import model_seed

# Below this L1 norm (before or after masking) the rescale is skipped, as in mergekit.
RESCALE_EPS = 1e-7


# -- randomness ----------------------------------------------------------------------------------
def make_generator(seed: int | None, index: int, device: torch.device | str) -> torch.Generator:
    """A fresh generator for model `index`: masks never touch (or depend on) the global RNG."""
    generator = torch.Generator(device=device)
    generator.manual_seed(model_seed(seed, index))
    return generator


def _uniform(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Always float32, whatever the delta dtype: the same draw for fp32, bf16 and fp16 inputs.
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)


# -- rescaling -----------------------------------------------------------------------------------
def l1_norm(tensor: torch.Tensor) -> float:
    """Sum of |x| accumulated in float64, in fixed-size chunks (bounded scratch memory)."""
    return float(sum64(tensor, absolute=True))


def apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """delta * mask, optionally rescaled so the result keeps the L1 norm of `delta`.

    The rescale is skipped when either norm is below RESCALE_EPS (nothing meaningful to match).
    """
    kept = delta * mask
    if not rescale:
        return kept
    factor = rescale_factor(l1_norm(delta), l1_norm(kept))
    return kept if factor is None else kept * factor


def rescale_factor(before: float, after: float) -> float | None:
    """||delta||_1 / ||kept||_1, or None (no rescale) when either is below RESCALE_EPS."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return before / after


# -- magnitude ranking ---------------------------------------------------------------------------
def _sort_key(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened, as mergekit sorts it: upcast to float32 on CPU, left as is on
    accelerators. float64 stays float64 (mergekit rounds it to float32, which can only turn
    distinct magnitudes into ties)."""
    key = delta.abs().reshape(-1)
    if key.device.type == "cpu" and key.dtype != torch.float64:
        key = key.to(torch.float32)
    return key


def _rank_bits(key: torch.Tensor) -> torch.Tensor:
    """Non-negative |delta| keys as integers of the same size: they order as the numbers do, and
    a NaN above every number (+Inf included), as in the descending argsort mergekit ranks by, so
    a NaN delta is counted among the k largest (float comparisons would skip it). The fused
    kernel ranks by these bits too: the two paths keep the same entries for any input."""
    return key.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[key.element_size()])


def _ascending_band(key: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Mask of the entries of 1-D `key` whose rank in a *stable* ascending sort is in [low, high).

    Two order statistics (kthvalue, O(n)) bound the band; only entries equal to a bound need
    their position to break the tie. O(n), where the full argsort mergekit uses is O(n log n),
    and the same set whenever no tie straddles a bound (always in practice in float32). When
    equal magnitudes do straddle a bound (common in bf16), mergekit's unstable argsort keeps an
    implementation-defined subset of them; we keep them by position, deterministically.
    """
    count = key.numel()
    low, high = max(low, 0), min(high, count)
    mask = torch.zeros(count, dtype=torch.bool, device=key.device)
    if high <= low:
        return mask
    low_value = torch.kthvalue(key, low + 1).values
    high_value = torch.kthvalue(key, high).values
    mask |= (key > low_value) & (key < high_value)
    for value in (low_value,) if bool(low_value == high_value) else (low_value, high_value):
        tied = torch.nonzero(key == value).reshape(-1)  # ascending positions = stable order
        first_rank = int((key < value).sum())
        ranks = first_rank + torch.arange(tied.numel(), device=key.device)
        mask[tied[(ranks >= low) & (ranks < high)]] = True
    return mask


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: True for the k = int(density * numel) largest |delta| of the whole tensor.

    Among equal magnitudes at the cut, earlier entries are kept (a stable descending sort).
    """
    if density <= 0 or delta.numel() == 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    count = delta.numel()
    k = max(1, int(density * count))  # keep at least one (mergekit 0.1.4 asserted on k == 0)
    key = _rank_bits(_sort_key(delta))
    if k >= count:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    cut = torch.kthvalue(key, count - k + 1).values  # the k-th largest magnitude: one O(n) pass
    mask = key > cut
    missing = k - int(mask.sum())
    if missing > 0:  # entries equal to the cut, earliest first
        mask[torch.nonzero(key == cut).reshape(-1)[:missing]] = True
    return mask.reshape(delta.shape)


def top_k_cut(keys, k: int, *, single_level: bool = False) -> tuple[torch.Tensor, int, int]:
    """The k-th largest of a stream of non-negative float32 keys, by radix selection.

    `keys()` yields the keys block by block (called once or twice). Non-negative floats order
    like their bit patterns, so a 32768-bucket histogram of the high 16 bits finds the bucket of
    the k-th largest and a 65536-bucket histogram of the low bits inside that bucket finds the
    value: two streaming passes, O(n), without the full-size copy torch.kthvalue makes, and exact.
    `single_level` skips the second pass when the low 16 bits are always 0 (bfloat16 keys).

    Returns (cut, greater, tied): the k-th largest value (0-dim float32), how many keys exceed
    it and how many equal it; 1 <= k - greater <= tied.
    """
    high = None
    for block in keys():
        counts = torch.bincount(block.view(torch.int32) >> 16, minlength=1 << 15)
        high = counts if high is None else high.add_(counts)
    bucket, greater, tied = KeyHistogram.of(high).kth_largest(k)
    if single_level:
        cut_bits = bucket << 16
    else:
        low = None
        for block in keys():
            bits = block.view(torch.int32)
            counts = torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
            low = counts if low is None else low.add_(counts)
        low_bits, greater_in_bucket, tied = KeyHistogram.of(low).kth_largest(k - greater)
        cut_bits, greater = (bucket << 16) | low_bits, greater + greater_in_bucket
    device = high.device
    cut = torch.tensor([cut_bits], dtype=torch.int32).view(torch.float32)[0].to(device)
    return cut, greater, tied


@dataclass(frozen=True)
class KeyHistogram:
    """Running counts of |delta| bit patterns (>> shift) over the non-empty buckets: the first
    level of a radix selection, kept per resident tensor, so that a top-k cut of any k is a binary
    search instead of a pass over the data. Compact: zero deltas (unchanged entries, bucket 0)
    are one count, and the counts are dense over the filled range or sparse, whichever is smaller
    (a few hundred KB at most for a float32 tensor of any size)."""

    zeros: int  # entries with delta == 0 (bucket 0)
    at_or_below: np.ndarray  # running counts (zeros included) at each stored bucket
    first: int  # dense form: bucket of at_or_below[0]
    buckets: np.ndarray | None = None  # sparse form: the bucket of each running count

    @classmethod
    def of(cls, counts: torch.Tensor) -> KeyHistogram:
        counts = counts.cpu()  # a histogram counted on an accelerator
        zeros = int(counts[0]) if counts.numel() else 0
        filled = torch.nonzero(counts[1:]).reshape(-1) + 1
        if filled.numel() == 0:
            return cls(zeros, np.zeros(0, dtype=np.int64), 1)
        first, last = int(filled[0]), int(filled[-1])
        dtype = np.int32 if int(counts.sum()) < 2**31 else np.int64
        if 2 * filled.numel() < last + 1 - first:  # sparse: bucket ids + running counts
            running = zeros + np.cumsum(counts[filled].numpy(), dtype=np.int64)
            return cls(zeros, running.astype(dtype), first, filled.numpy().astype(np.int32))
        running = zeros + np.cumsum(counts[first : last + 1].numpy(), dtype=np.int64)
        return cls(zeros, running.astype(dtype), first)

    @property
    def nbytes(self) -> int:
        return self.at_or_below.nbytes + (self.buckets.nbytes if self.buckets is not None else 0)

    @functools.cached_property
    def raw(self) -> tuple[int, int, int, int, int, int]:
        """These fields as plain integers for the fused kernel's copy of `kth_largest` (fused.c):
        zeros, stored buckets, address and item size of the running counts (contiguous int32 or
        int64, as `of` makes them), first bucket, address of the int32 bucket ids (0 when dense).
        Valid while this histogram lives."""
        at_or_below = self.at_or_below
        ids = 0 if self.buckets is None else self.buckets.__array_interface__["data"][0]
        address = at_or_below.__array_interface__["data"][0]
        return self.zeros, at_or_below.size, address, at_or_below.itemsize, self.first, ids

    def kth_largest(self, k: int) -> tuple[int, int, int]:
        """(bucket, entries in higher buckets, entries in it) for the k-th largest key."""
        at_or_below = self.at_or_below
        total = int(at_or_below[-1]) if at_or_below.size else self.zeros
        if total - k < self.zeros:  # the cut falls among the zero deltas
            return 0, total - self.zeros, self.zeros
        index = int(np.searchsorted(at_or_below, total - k, side="right"))
        below = int(at_or_below[index - 1]) if index else self.zeros
        bucket = int(self.buckets[index]) if self.buckets is not None else self.first + index
        return bucket, total - int(at_or_below[index]), int(at_or_below[index]) - below


class MagnitudeCut:
    """The TIES trim as a threshold, applied block by block: keep |delta| > cut, plus the
    first `k - greater` entries equal to cut in position order (what `magnitude_mask` keeps).

    Blocks must be visited in order, once per pass; `restart()` begins a new pass.
    """

    def __init__(self, cut: torch.Tensor, greater: int, tied: int, k: int):
        self.cut = _rank_bits(cut)
        self.wanted_ties = k - greater
        self.all_ties = self.wanted_ties >= tied
        self.taken = 0

    def restart(self) -> None:
        self.taken = 0

    def mask(self, key: torch.Tensor) -> torch.Tensor:
        """Keep flags for the next block of float32 |delta| keys."""
        key = _rank_bits(key)
        if self.all_ties:
            return key >= self.cut
        keep = key > self.cut
        if self.taken < self.wanted_ties:
            tied = torch.nonzero(key == self.cut).reshape(-1)[: self.wanted_ties - self.taken]
            keep[tied] = True
            self.taken += tied.numel()
        return keep


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the largest-magnitude fraction `density` of `delta` (per tensor, not per row)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    return apply_mask(delta, magnitude_mask(delta, density), rescale)


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs band: True for ascending magnitude ranks [n_bot, n_bot + target).

    target = int(density * numel) entries are kept; n_top = int(gamma * numel) outliers are
    dropped from the top, fewer when needed to keep `target` entries (n_bot is clamped at 0).
    """
    count = delta.numel()
    target = max(int(density * count), 0)
    n_top = int(gamma * count)
    n_bot = max(0, count - target - n_top)
    # n_top == 0 keeps the top `target` entries; mergekit 0.1.4 zeroed everything here.
    return _ascending_band(_sort_key(delta), n_bot, n_bot + target).reshape(delta.shape)


def breadcrumbs(delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> torch.Tensor:
    """Drop the gamma fraction of largest |delta| (outliers) and the smallest, keep `density`."""
    if density >= 1:
        return delta
    if delta.numel() == 0:
        return delta.clone()
    return apply_mask(delta, breadcrumbs_mask(delta, density, gamma), rescale)


# -- random masks --------------------------------------------------------------------------------
def dare_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept independently with probability `density`."""
    return _uniform(delta, generator) < density


def dare_mask_blocks(
    count: int, density: float, generator: torch.Generator, device: torch.device, spans
) -> torch.Tensor:
    """`dare_mask` of a flat tensor of `count` entries, drawn block by block (same bits).

    A CPU generator yields the same stream whether it fills one tensor or consecutive pieces
    (tests/test_methods.py checks it), so no full-size float32 draw is ever allocated.
    """
    mask = torch.empty(count, dtype=torch.bool, device=device)
    for start, stop in spans:
        draw = torch.rand(stop - start, generator=generator, device=device, dtype=torch.float32)
        torch.lt(draw, density, out=mask[start:stop])
    return mask


def dare(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE drop: Bernoulli(density) mask, then (optionally) the L1 rescale."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    return apply_mask(delta, dare_mask(delta, density, generator), rescale)


def check_della(density: float, epsilon: float) -> None:
    """DELLA keep probabilities span [density - epsilon, density + epsilon]: both must be in (0, 1)."""
    if 0 < density < 1 and (density - epsilon <= 0 or density + epsilon >= 1):
        raise ValueError(
            f"keep probabilities density - epsilon and density + epsilon must lie in (0, 1), "
            f"got density={density:g}, epsilon={epsilon:g}"
        )


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability (float32, shape of `delta`), from magnitude ranks per row.

    Ranks run along dim 1 (1-D and 0-D tensors are one row), are min-max normalised to [0, 1]
    and mapped linearly to [density - epsilon, density + epsilon]: larger magnitudes are kept
    more often. A row of length 1 gets probability `density` (its normalised rank is 0/0).
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    length = rows.shape[1]
    # The same sort as mergekit (on |x| in the input dtype), so equal magnitudes rank alike.
    order = torch.argsort(rows.abs(), dim=1)
    # Invert the permutation with a scatter (one sort instead of mergekit's two).
    positions = torch.arange(length, device=rows.device).reshape(1, length, *([1] * (rows.dim() - 2)))
    rank = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
    if length > 1:
        rank_norm = rank.to(torch.float32) / (length - 1)
    else:
        rank_norm = torch.full(rows.shape, 0.5, dtype=torch.float32, device=rows.device)
    probabilities = (density - epsilon) + rank_norm * (2 * epsilon)
    return probabilities.reshape(delta.shape)


def della_mask(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """DELLA: each entry kept with its rank-dependent probability (`della_probabilities`)."""
    return _uniform(delta, generator) < della_probabilities(delta, density, epsilon)


def della(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool = True,
) -> torch.Tensor:
    """DELLA MagPrune: rank-dependent Bernoulli mask, then (optionally) the L1 rescale."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della(density, epsilon)
    if delta.numel() == 0:
        return delta.clone()
    return apply_mask(delta, della_mask(delta, density, epsilon, generator), rescale)
