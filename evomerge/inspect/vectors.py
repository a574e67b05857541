"""Pure task-vector statistics: sums over entries, then the ratios a merge recipe depends on.

A task vector is a fine-tune minus its base. For one tensor, `tensor_sums` takes the base's
entries and the k task vectors' entries at the same positions (all of them, or a sample) and
returns sums scaled to the whole tensor (`scale` = entries in the tensor / entries given), so
sums from tensors of different sizes, sampled or not, add up to estimates over the concatenated
vector. `pair_stats` turns summed `PairSums` into cosines, norms and rates.

TIES trimming is modelled per tensor as TIES does it: each task vector keeps the `density`
fraction of its entries with the largest magnitude (zeros never count as kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 1 << 20  # entries per step of the float64 sums (bounds the temporaries on whole tensors)


@dataclass
class PairSums:
    """Running sums over entries (each tensor's scaled to its full size); `+` adds two."""

    gram: np.ndarray  # (k, k): sum of delta_i * delta_j
    base_sq: float  # sum of base^2
    both_nonzero: np.ndarray  # (k, k): entries where delta_i and delta_j are both non-zero
    sign_conflict: np.ndarray  # (k, k): of those, entries where their signs differ
    kept: np.ndarray  # (D, k): entries each task vector keeps at each density
    kept_energy: np.ndarray  # (D, k): sum of delta_i^2 over the kept entries
    overlap: np.ndarray  # (D, k, k): entries kept by both i and j
    overlap_conflict: np.ndarray  # (D, k, k): of those, entries with opposite signs
    tensors: int = 0
    entries: int = 0  # entries in the tensors summed (their full sizes)
    entries_read: int = 0  # entries actually read

    @classmethod
    def zeros(cls, models: int, densities: int) -> PairSums:
        square = np.zeros((models, models))
        return cls(
            gram=square.copy(),
            base_sq=0.0,
            both_nonzero=square.copy(),
            sign_conflict=square.copy(),
            kept=np.zeros((densities, models)),
            kept_energy=np.zeros((densities, models)),
            overlap=np.zeros((densities, models, models)),
            overlap_conflict=np.zeros((densities, models, models)),
        )

    def __add__(self, other: PairSums) -> PairSums:
        return PairSums(
            gram=self.gram + other.gram,
            base_sq=self.base_sq + other.base_sq,
            both_nonzero=self.both_nonzero + other.both_nonzero,
            sign_conflict=self.sign_conflict + other.sign_conflict,
            kept=self.kept + other.kept,
            kept_energy=self.kept_energy + other.kept_energy,
            overlap=self.overlap + other.overlap,
            overlap_conflict=self.overlap_conflict + other.overlap_conflict,
            tensors=self.tensors + other.tensors,
            entries=self.entries + other.entries,
            entries_read=self.entries_read + other.entries_read,
        )


def trim_thresholds(deltas: torch.Tensor, densities: tuple[float, ...]) -> torch.Tensor:
    """(D, k): the smallest |delta| each task vector keeps at each density (top int(density * n),
    at least one entry, as TIES keeps)."""
    magnitudes = deltas.abs().float().numpy()
    n = magnitudes.shape[1]
    ranks = [n - min(n, max(1, int(density * n))) for density in densities]  # 0-based, ascending order
    # one introselect pass places every density's cut (about half the time of a kthvalue per density)
    cuts = np.partition(magnitudes, sorted(set(ranks)), axis=1)[:, ranks]
    return torch.from_numpy(np.ascontiguousarray(cuts.T))


def tensor_sums(
    base: torch.Tensor, deltas: torch.Tensor, densities: tuple[float, ...], *, scale: float = 1.0, numel: int = 0
) -> PairSums:
    """The sums of one tensor: `base` (n,) and `deltas` (k, n) are entries at the same positions.

    `scale` multiplies every sum (the tensor's size over n when the entries are a sample); `numel`
    is the tensor's full size (default n).
    """
    models, n = deltas.shape
    sums = PairSums.zeros(models, len(densities))
    thresholds = trim_thresholds(deltas, densities).double() if n else None
    for start in range(0, n, CHUNK):
        block = deltas[:, start : start + CHUNK].double()
        sums.gram += (block @ block.T).numpy()
        sums.base_sq += float(base[start : start + CHUNK].double().square().sum())
        # 0/1 masks in float32: their products count entries exactly (a chunk holds < 2^24)
        positive, negative = (block > 0).float(), (block < 0).float()
        nonzero = positive + negative
        sums.both_nonzero += (nonzero @ nonzero.T).double().numpy()
        opposite = (positive @ negative.T).double().numpy()
        sums.sign_conflict += opposite + opposite.T
        magnitude, energy = block.abs(), block.square()
        for row in range(len(densities)):
            kept = ((magnitude >= thresholds[row][:, None]) & (magnitude > 0)).float()
            sums.kept[row] += kept.sum(dim=1).double().numpy()
            sums.kept_energy[row] += (energy * kept).sum(dim=1).numpy()
            sums.overlap[row] += (kept @ kept.T).double().numpy()
            kept_opposite = ((kept * positive) @ (kept * negative).T).double().numpy()
            sums.overlap_conflict[row] += kept_opposite + kept_opposite.T
    for name in ("gram", "both_nonzero", "sign_conflict", "kept", "kept_energy", "overlap", "overlap_conflict"):
        setattr(sums, name, getattr(sums, name) * scale)
    sums.base_sq *= scale
    sums.tensors, sums.entries, sums.entries_read = 1, numel or n, n
    return sums


@dataclass(frozen=True)
class PairStats:
    """What `pair_stats` derives from sums; matrices are nested tuples (k x k), NaN where undefined."""

    cosine: tuple[tuple[float, ...], ...]  # cosine similarity of task vectors i and j
    relative_norm: tuple[float, ...]  # ||delta_i|| / ||base||
    sign_conflict: tuple[tuple[float, ...], ...]  # share of entries, both non-zero, with opposite signs
    densities: tuple[float, ...]
    trim_overlap: tuple[tuple[tuple[float, ...], ...], ...]  # (D, k, k): kept by both / sqrt(kept_i kept_j)
    trim_overlap_conflict: tuple[tuple[tuple[float, ...], ...], ...]  # (D, k, k): opposite signs among those
    kept_energy: tuple[tuple[float, ...], ...]  # (D, k): share of ||delta_i||^2 the kept entries carry
    tensors: int
    entries: int
    entries_read: int


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def _nested(array: np.ndarray) -> tuple:
    return tuple(_nested(row) for row in array) if array.ndim > 1 else tuple(float(v) for v in array)


def pair_stats(sums: PairSums, densities: tuple[float, ...]) -> PairStats:
    norms = np.sqrt(np.diag(sums.gram))
    cosine = _ratio(sums.gram, np.outer(norms, norms))
    np.fill_diagonal(cosine, np.where(norms > 0, 1.0, np.nan))
    base_norm = np.sqrt(sums.base_sq)
    relative = norms / base_norm if base_norm > 0 else np.full_like(norms, np.nan)
    kept_pairs = np.sqrt(sums.kept[:, :, None] * sums.kept[:, None, :])
    return PairStats(
        cosine=_nested(np.clip(cosine, -1.0, 1.0)),
        relative_norm=_nested(relative),
        sign_conflict=_nested(_ratio(sums.sign_conflict, sums.both_nonzero)),
        densities=tuple(densities),
        trim_overlap=_nested(_ratio(sums.overlap, kept_pairs)),
        trim_overlap_conflict=_nested(_ratio(sums.overlap_conflict, sums.overlap)),
        kept_energy=_nested(_ratio(sums.kept_energy, np.broadcast_to(np.diag(sums.gram), sums.kept_energy.shape))),
        tensors=sums.tensors,
        entries=sums.entries,
        entries_read=sums.entries_read,
    )


def sum_norm_ratio(cosine: tuple[tuple[float, ...], ...], norms: tuple[float, ...]) -> float:
    """||sum of the task vectors|| / mean ||task vector||: sqrt(k) when they are orthogonal, k when
    they point the same way, below sqrt(k) when they cancel (NaN entries count as orthogonal)."""
    c = np.nan_to_num(np.asarray(cosine, dtype=float))
    n = np.asarray(norms, dtype=float)
    mean = float(n.mean()) if len(n) else 0.0
    if mean <= 0:
        return float("nan")
    return float(np.sqrt(max(0.0, float(n @ c @ n)))) / mean
