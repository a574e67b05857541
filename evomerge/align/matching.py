"""Git Re-Basin weight matching (Ainsworth et al. 2022): permute model B's hidden units to match A's.

Maximises sum over tensors of <W^A, P(W^B)> (P applies every permutation to its axes) by
coordinate descent: one permutation at a time, the others held fixed, the objective is linear in
that permutation, so its best value is one linear assignment (scipy's `linear_sum_assignment`)
on the summed similarity of its units. Sweeps go over the permutations in a seeded random order
until a whole sweep changes nothing (or `max_iterations` sweeps). Each step can only raise the
objective, so the descent ends.

A permutation is an index array: unit i of the result is unit perm[i] of B. For `heads.L` it is
over query heads, and keeps each key/value group's query heads together (see `spec.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from evomerge.align.spec import Axis, PermutationSpec

Permutations = dict[str, np.ndarray]


def identity(spec: PermutationSpec) -> Permutations:
    return {name: np.arange(size) for name, size in spec.sizes.items()}


def _kv_perm(q_perm: np.ndarray, group: int) -> np.ndarray:
    """The key/value head order implied by a query-head permutation that keeps groups whole."""
    return q_perm[::group] // group


def _units(spec: PermutationSpec, axis: Axis) -> tuple[int, int]:
    """(number of units, unit length) along an axis."""
    size = spec.sizes[axis.perm]
    if axis.kind == "q_heads":
        return size, spec.head_dim
    if axis.kind == "kv_heads":
        return size // spec.group, spec.head_dim
    return size, 1


def _index(spec: PermutationSpec, axis: Axis, perm: np.ndarray) -> np.ndarray:
    return _kv_perm(perm, spec.group) if axis.kind == "kv_heads" else perm


def permute_axis(spec: PermutationSpec, tensor: torch.Tensor, dim: int, axis: Axis, perm: np.ndarray) -> torch.Tensor:
    """`tensor` with the units along `dim` reordered by `perm` (whole heads for head axes)."""
    count, unit = _units(spec, axis)
    index = torch.as_tensor(_index(spec, axis, perm), dtype=torch.long, device=tensor.device)
    moved = tensor.movedim(dim, 0)
    rest = moved.shape[1:]
    reordered = moved.reshape(count, unit, *rest).index_select(0, index).reshape(count * unit, *rest)
    return reordered.movedim(0, dim)


def apply_permutations(
    spec: PermutationSpec, name: str, tensor: torch.Tensor, perms: Mapping[str, np.ndarray], *, skip: str | None = None
) -> torch.Tensor:
    """One tensor with every permutation of `perms` applied (all but `skip`)."""
    for dim, axis in enumerate(spec.axes[name]):
        if axis is not None and axis.perm != skip:
            tensor = permute_axis(spec, tensor, dim, axis, perms[axis.perm])
    return tensor


def split_fused(spec: PermutationSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as matching sees them: each fused tensor (Phi-3's qkv_proj, gate_up_proj) as its parts."""
    split: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in spec.fused:
            parts = spec.fused[name]
            split.update(zip((part for part, _ in parts), tensor.split([rows for _, rows in parts], dim=0)))
        else:
            split[name] = tensor
    return split


def permute_tensor(
    spec: PermutationSpec, name: str, tensor: torch.Tensor, perms: Mapping[str, np.ndarray]
) -> torch.Tensor:
    """One checkpoint tensor with every permutation applied (a fused tensor part by part)."""
    if name not in spec.fused:
        return apply_permutations(spec, name, tensor, perms)
    parts = split_fused(spec, {name: tensor})
    return torch.cat([apply_permutations(spec, part, piece, perms) for part, piece in parts.items()], dim=0)


def _similarity(
    spec: PermutationSpec,
    perm_name: str,
    users: list[tuple[str, int, Axis]],
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray | None]:
    """S[i, j] = <unit i of A, unit j of B with the other permutations applied>, summed over the
    tensors `perm_name` acts on; for a head permutation also the key/value-group similarity."""
    size = spec.sizes[perm_name]
    main = np.zeros((size, size))
    kv = np.zeros((size // spec.group,) * 2) if perm_name.startswith("heads.") else None
    for name, dim, axis in users:
        count, _ = _units(spec, axis)
        other = apply_permutations(spec, name, b[name], perms, skip=perm_name)
        left = a[name].movedim(dim, 0).reshape(count, -1)
        right = other.movedim(dim, 0).reshape(count, -1)
        product = (left @ right.T).double().cpu().numpy()
        if axis.kind == "kv_heads":
            kv += product
        else:
            main += product
    return main, kv


def _solve_heads(q_sim: np.ndarray, kv_sim: np.ndarray, group: int) -> np.ndarray:
    """The best query-head permutation that keeps key/value groups whole: the value of matching
    group g of A to group h of B is their key/value similarity plus the best assignment of the
    query heads inside them; one more assignment then pairs the groups."""
    groups = kv_sim.shape[0]
    pair_value = kv_sim.copy()
    inner: dict[tuple[int, int], np.ndarray] = {}
    for g in range(groups):
        for h in range(groups):
            block = q_sim[g * group : (g + 1) * group, h * group : (h + 1) * group]
            rows, cols = linear_sum_assignment(block, maximize=True)
            pair_value[g, h] += block[rows, cols].sum()
            inner[g, h] = cols
    _, matched = linear_sum_assignment(pair_value, maximize=True)
    return np.concatenate([matched[g] * group + inner[g, matched[g]] for g in range(groups)])


def _score(spec: PermutationSpec, main: np.ndarray, kv: np.ndarray | None, perm: np.ndarray) -> float:
    value = float(main[np.arange(len(perm)), perm].sum())
    if kv is not None:
        kv_perm = _kv_perm(perm, spec.group)
        value += float(kv[np.arange(len(kv_perm)), kv_perm].sum())
    return value


def objective(
    spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], perms: Permutations
) -> float:
    """sum over the permuted tensors of <W^A, P(W^B)>."""
    return float(sum(float((a[n] * apply_permutations(spec, n, b[n], perms)).sum()) for n in a))


@dataclass(frozen=True)
class MatchResult:
    perms: Permutations
    sweeps: int  # sweeps run (the last one changed nothing unless it hit max_iterations)
    converged: bool
    objective_before: float  # at the identity
    objective_after: float


def weight_matching(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iterations: int = 100,
    on_step: Callable[[int, int], None] | None = None,
) -> MatchResult:
    """Permutations of B's units that maximise its inner product with A (float32 tensors keyed by
    name, on any one device: checkpoint tensors, fused ones included, that some permutation acts on). `on_step(sweep, step)` is called
    after each permutation's update (steps 1 .. len(spec.sizes) in each sweep), for progress."""
    a, b = split_fused(spec, a), split_fused(spec, b)
    users: dict[str, list[tuple[str, int, Axis]]] = {name: [] for name in spec.sizes}
    for name in a:
        for dim, axis in enumerate(spec.axes[name]):
            if axis is not None:
                users[axis.perm].append((name, dim, axis))
    perms = identity(spec)
    before = objective(spec, a, b, perms)
    rng = np.random.default_rng(seed)
    order = sorted(spec.sizes)
    sweeps, converged = 0, False
    while sweeps < max_iterations:
        sweeps += 1
        changed = 0
        for step, index in enumerate(rng.permutation(len(order)), start=1):
            name = order[index]
            main, kv = _similarity(spec, name, users[name], a, b, perms)
            best = (
                _solve_heads(main, kv, spec.group) if kv is not None else linear_sum_assignment(main, maximize=True)[1]
            )
            old, new = _score(spec, main, kv, perms[name]), _score(spec, main, kv, best)
            if new > old + 1e-9 * max(1.0, abs(old)):  # ties keep the current order: no endless flipping
                perms[name] = best
                changed += 1
            if on_step is not None:
                on_step(sweeps, step)
        if not changed:
            converged = True
            break
    return MatchResult(perms, sweeps, converged, before, objective(spec, a, b, perms))
