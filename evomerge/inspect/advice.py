"""The merge guides' reading of an inspection, as rules on its numbers, and a starting genome.

Each rule names its threshold in the sentence it writes, so a reader can check it against the
tables. The suggested genome is a starting range for a search's `genome:`, not a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.inspect.analysis import Inspection
from evomerge.inspect.vectors import sum_norm_ratio

HIGH_COSINE = 0.5  # every pair at or above: the task vectors point the same way
NEAR_ZERO = 0.1  # |cosine| below: unrelated directions
OPPOSED = -0.1  # below: the pair pulls apart
UNRELATED_SIGNS = 0.4  # sign-conflict rate at or above: close to the 0.5 of unrelated signs
AGREEING_SIGNS = 0.3  # below: signs mostly agree
NORM_SPREAD = 3.0  # largest / smallest task-vector norm above: weights need room
GROUP_SPREAD = 0.2  # range of the mean cosine across layer groups above: per-group genes pay
ENERGY_KEPT = 0.75  # lowest suggested density: every task vector keeps this share of its squared norm
SHARED_ABOVE_CHANCE = 1.5  # trimmed overlap above this many times chance: the kept entries coincide


@dataclass(frozen=True)
class Advice:
    reading: tuple[str, ...]  # sentences, each with the threshold it applied
    genome: dict[str, Any] = field(default_factory=dict)  # a `genome:` section to start a search from


def _pairs(matrix: tuple[tuple[float, ...], ...], names: tuple[str, ...]) -> list[tuple[str, float]]:
    k = len(names)
    return [(f"{names[i]}-{names[j]}", matrix[i][j]) for i in range(k) for j in range(i + 1, k)]


def _mean_off_diagonal(matrix: tuple[tuple[float, ...], ...]) -> float:
    array = np.asarray(matrix, dtype=float)
    k = len(array)
    if k < 2:
        return float("nan")
    values = array[~np.eye(k, dtype=bool)]
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def _listing(pairs: list[tuple[str, float]], limit: int = 4) -> str:
    shown = ", ".join(f"{name} {value:+.2f}" for name, value in pairs[:limit])
    return shown + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")


def advise(inspection: Inspection) -> Advice:
    """The reading (cosine, signs, trimming, sizes, layer groups) and a starting genome."""
    stats = inspection.overall
    names = inspection.models
    unchanged = [name for name, norm in zip(names, stats.relative_norm) if not norm > 0]
    if len(unchanged) == len(names):
        return Advice(
            reading=("Every model equals the base in the entries read (task vectors of norm 0): nothing to merge.",)
        )
    reading: list[str] = []
    if unchanged:
        verb = "equals" if len(unchanged) == 1 else "equal"
        reading.append(f"{', '.join(unchanged)} {verb} the base in the entries read: leave out of the merge.")
    genome: dict[str, Any] = {}
    if len(names) < 2:
        reading.append("One model: no pairs to compare; its task vector's size and trimming are shown above.")
        cosines = []
    else:
        cosines = [(n, c) for n, c in _pairs(stats.cosine, names) if not math.isnan(c)]
    values = [c for _, c in cosines]
    opposed = [(n, c) for n, c in cosines if c < OPPOSED]
    unrelated = [(n, c) for n, c in cosines if abs(c) < NEAR_ZERO]
    if values and min(values) >= HIGH_COSINE:
        reading.append(
            f"High positive cosine (every pair >= {HIGH_COSINE}, lowest {min(values):.2f}): the task vectors point "
            "the same way, so linear merging or task arithmetic is safe; their sum grows almost k-fold, so keep "
            "the weights low."
        )
        methods = ["linear", "task_arithmetic"]
    elif opposed:
        reading.append(
            f"Negative cosine (below {OPPOSED}: {_listing(opposed)}): these task vectors pull in opposite "
            "directions and a plain sum cancels them; expect interference, prefer TIES or DARE-TIES (the sign "
            "election keeps one direction per entry)."
        )
        methods = ["ties", "dare_ties"]
    elif unrelated:
        reading.append(
            f"Cosine near zero (|cosine| < {NEAR_ZERO}: {_listing(unrelated)}): unrelated directions; expect "
            "interference where they touch the same entries, prefer TIES or DARE-TIES."
        )
        methods = ["ties", "dare_ties"]
    elif values:
        reading.append(
            f"Moderate positive cosine (every pair between {NEAR_ZERO} and {HIGH_COSINE}: {min(values):.2f} to "
            f"{max(values):.2f}): related but distinct skills; task arithmetic works, TIES can remove the "
            "interference that is left."
        )
        methods = ["task_arithmetic", "ties"]
    else:
        methods = ["task_arithmetic", "ties"]
    genome["methods"] = methods
    if len(names) >= 2:
        conflict = _mean_off_diagonal(stats.sign_conflict)
        if not math.isnan(conflict):
            if conflict >= UNRELATED_SIGNS:
                verdict = (
                    f"close to the 0.5 of unrelated signs (>= {UNRELATED_SIGNS}): TIES's sign election matters here"
                )
            elif conflict < AGREEING_SIGNS:
                verdict = f"mostly agreeing (< {AGREEING_SIGNS}): the sign election changes little"
            else:
                verdict = f"between agreeing (< {AGREEING_SIGNS}) and unrelated (>= {UNRELATED_SIGNS})"
            reading.append(
                f"Signs: where two task vectors both change an entry, {conflict:.0%} of the time they disagree, "
                f"{verdict}."
            )
        density = stats.densities[0]
        overlap = _mean_off_diagonal(stats.trim_overlap[0])
        if not math.isnan(overlap):
            shared = overlap > SHARED_ABOVE_CHANCE * density
            conflict_kept = _mean_off_diagonal(stats.trim_overlap_conflict[0])
            reading.append(
                f"Trimmed to density {density:g}, a pair shares {overlap:.0%} of its kept entries (chance: {density:.0%}); "
                + (
                    f"above {SHARED_ABOVE_CHANCE}x chance, the largest changes coincide, and {conflict_kept:.0%} of the "
                    "shared ones disagree in sign."
                    if shared
                    else f"within {SHARED_ABOVE_CHANCE}x chance, so trimming keeps the task vectors mostly apart."
                )
            )
    norms = [n for n in stats.relative_norm if not math.isnan(n)]
    if norms:
        spread = max(norms) / min(norms) if min(norms) > 0 else math.inf
        largest, smallest = names[stats.relative_norm.index(max(norms))], names[stats.relative_norm.index(min(norms))]
        sentence = f"Size: each task vector is {min(norms):.1%} to {max(norms):.1%} of the base's norm ({smallest} to {largest})"
        if spread > NORM_SPREAD:
            sentence += f", a {spread:.1f}x spread (> {NORM_SPREAD}x): give the per-model weights room, or the small one is drowned."
        else:
            sentence += f", within {NORM_SPREAD}x of each other: equal weights start fair."
        reading.append(sentence)
    ratio = sum_norm_ratio(stats.cosine, stats.relative_norm)
    if not math.isnan(ratio) and ratio > 0:
        start = 1 / ratio
        low, high = round(start / 2, 2), round(min(1.0, start * 2), 2)
        genome["weight"] = [low, high] if high > low else [0.0, 1.0]
        reading.append(
            f"Weights: the task vectors' sum is {ratio:.2f}x the mean one (sqrt(k) = {math.sqrt(len(names)):.2f} if "
            f"orthogonal, k = {len(names)} if aligned); a weight of {start:.2f} keeps the merged change about one "
            f"fine-tune's size, hence weight [{genome['weight'][0]:g}, {genome['weight'][1]:g}]."
        )
    if any(m in ("ties", "dare_ties") for m in methods):
        energies = np.asarray(stats.kept_energy, dtype=float)
        enough = [
            d for d, row in zip(stats.densities, energies) if not np.isnan(row).any() and row.min() >= ENERGY_KEPT
        ]
        low = min(enough) if enough else max(stats.densities)
        genome["density"] = [low, 1.0] if low < 1 else 1.0
        reading.append(
            f"Density: from {low:g} every task vector keeps >= {ENERGY_KEPT:.0%} of its squared norm "
            f"(lowest tried: {min(stats.densities):g}), hence density [{low:g}, 1.0]."
            if enough
            else f"Density: no density tried keeps {ENERGY_KEPT:.0%} of every task vector's squared norm; "
            f"start at {low:g}."
        )
    if any(m != "linear" for m in methods):
        genome["lambda"] = [0.5, 1.5]
    group_means = [
        (g.name, _mean_off_diagonal(g.stats.cosine))
        for g in inspection.layer_groups
        if g.name.startswith("layer") and len(names) >= 2
    ]
    group_means = [(n, v) for n, v in group_means if not math.isnan(v)]
    if len(group_means) >= 2:
        (low_name, low_value), (high_name, high_value) = (
            min(group_means, key=lambda x: x[1]),
            max(group_means, key=lambda x: x[1]),
        )
        varies = high_value - low_value > GROUP_SPREAD
        reading.append(
            f"Layer groups: mean cosine {low_value:.2f} ({low_name}) to {high_value:.2f} ({high_name}); "
            + (
                f"a range above {GROUP_SPREAD}: give each group its own genes (layer_granularity {inspection.group_size})."
                if varies
                else f"within {GROUP_SPREAD}: one set of genes for all layers may do (layer_granularity 0); "
                "finer groups cost search time."
            )
        )
        if not varies:
            genome = {"layer_granularity": 0, **genome}
        elif inspection.num_layers % inspection.group_size == 0:
            genome = {"layer_granularity": inspection.group_size, **genome}
    ends = [
        (g.name, _mean_off_diagonal(g.stats.cosine))
        for g in inspection.layer_groups
        if not g.name.startswith("layer") and len(names) >= 2
    ]
    if group_means and ends:
        layers_mean = float(np.mean([v for _, v in group_means]))
        apart = [(n, v) for n, v in ends if not math.isnan(v) and abs(v - layers_mean) > GROUP_SPREAD]
        if apart:
            listing = ", ".join(f"{n} {v:.2f}" for n, v in apart)
            reading.append(
                f"Ends: mean cosine {listing} against {layers_mean:.2f} in the layers (apart by more than "
                f"{GROUP_SPREAD}): keep their own genes (embeddings: true, head: true)."
            )
            genome.update({"embeddings": True, "head": True})
    return Advice(reading=tuple(reading), genome=genome)
