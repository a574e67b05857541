"""`evomerge inspect`: the pre-merge check of a model family's task vectors.

Cosine similarity, relative size, sign conflicts and TIES-trim overlap of each fine-tune's task
vector (fine-tune - base), overall, per layer group and per tensor kind; read lazily, sampled
on big tensors. `vectors` is the pure math, `sampling` and `analysis` the reading, `advice` the
rules that turn numbers into a reading and a starting genome.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.inspect.advice import Advice, advise
from evomerge.inspect.analysis import DEFAULT_DENSITIES, GroupStats, Inspection, inspect_models
from evomerge.inspect.sampling import Sampling
from evomerge.inspect.sources import Family, family_from_file
from evomerge.inspect.vectors import PairStats


def inspect_file(path: Path, **options) -> Inspection:
    """`inspect_models` on the base and models a space file or a merge YAML names; `group_size`
    defaults to the space genome's layer_granularity."""
    family = family_from_file(path)
    options.setdefault("group_size", family.group_size)
    options.setdefault("allow_pickle", family.allow_pickle)
    return inspect_models(family.base, family.models, **options)


__all__ = [
    "DEFAULT_DENSITIES",
    "Advice",
    "Family",
    "GroupStats",
    "Inspection",
    "PairStats",
    "Sampling",
    "advise",
    "family_from_file",
    "inspect_file",
    "inspect_models",
]
