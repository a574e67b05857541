"""The built-in merge methods, registered in the order `evomerge methods` and error messages list them.

A new method is one module under `family/` that builds its `MethodSpec` and one line here.
"""

from __future__ import annotations

from evomerge.merge.family import (
    arcee_fusion,
    data_weighted,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    passthrough,
    ram,
    sce,
    slerp,
    task_vectors,
)
from evomerge.merge.registry import register

register(linear.SPEC)
register(slerp.SLERP)
register(slerp.NUSLERP)
for spec in task_vectors.SPECS:  # task_arithmetic, ties, dare_*, breadcrumbs*, della*
    register(spec)
register(model_stock.SPEC)
register(passthrough.SPEC)
register(multislerp.SPEC)
register(nearswap.SPEC)
register(ram.SPEC)
register(ram.SPEC_PLUS_TL)
register(sce.SPEC)
register(arcee_fusion.SPEC)
register(karcher.SPEC)
for spec in data_weighted.SPECS:  # fisher, regmean: statistics from data (evomerge.data_stats)
    register(spec)
