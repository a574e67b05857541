"""`evomerge inspect`: the pre-merge check of a model family's task vectors.

Cosine similarity, relative size, sign conflicts and TIES-trim overlap of each fine-tune's task
vector (fine-tune - base), overall, per layer group and per tensor kind; read lazily, sampled
on big tensors. `vectors` is the pure math, `sampling` and `analysis` the reading, `advice` the
rules that turn numbers into a reading and a starting genome.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from evomerge.inspect.defaults import DEFAULT_DENSITIES

if TYPE_CHECKING:
    from evomerge.inspect.advice import Advice, advise
    from evomerge.inspect.analysis import GroupStats, Inspection, inspect_file, inspect_models
    from evomerge.inspect.sampling import Sampling
    from evomerge.inspect.sources import Family, family_from_file
    from evomerge.inspect.vectors import PairStats

# Loaded on first use (PEP 562), so the command line's import of the defaults does not pull in torch.
_HOMES = {
    "Advice": "advice",
    "advise": "advice",
    "GroupStats": "analysis",
    "Inspection": "analysis",
    "inspect_file": "analysis",
    "inspect_models": "analysis",
    "Sampling": "sampling",
    "Family": "sources",
    "family_from_file": "sources",
    "PairStats": "vectors",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


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
