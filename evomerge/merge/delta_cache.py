"""The cross-trial cache of delta statistics between tensors that never change.

A search merges the same resident sources again and again with new parameters; the |delta|
histogram of a (fine-tune, base) pair does not depend on those parameters, so a TIES cut of any
density can come from the cached histogram instead of a pass over the data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from evomerge.merge import sparsify


class DeltaCache:
    """Whole-tensor statistics of deltas between tensors that never change (a search's resident
    sources), kept across merges: with the |delta| histogram cached, the TIES cut of any density
    is a lookup instead of a pass over the data. Thread-safe for concurrent merges (a lost race
    computes the same value twice)."""

    def __init__(self) -> None:
        self._histograms: dict[Any, sparsify.KeyHistogram] = {}

    @staticmethod
    def key(source: Any, base: Any, dtype: torch.dtype) -> tuple:
        """The key of the |delta| between two inputs named by their cache keys, in `dtype`."""
        return source, base, str(dtype)

    def histogram(self, key: Any, compute: Callable[[], torch.Tensor]) -> sparsify.KeyHistogram:
        found = self._histograms.get(key)
        if found is None:
            found = self._histograms[key] = sparsify.KeyHistogram.of(compute())
        return found

    def __len__(self) -> int:
        return len(self._histograms)
