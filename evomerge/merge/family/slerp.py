"""slerp and nuslerp: spherical interpolation between two models (or their deltas from a base)."""

from __future__ import annotations

import math

import torch

from evomerge.config.numbers import ParameterRange
from evomerge.merge import blocks
from evomerge.merge.family.common import result_tensor, row_dot
from evomerge.merge.registry import MethodSpec, Param


def _flat_dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """a.a, b.b and a.b over the whole (flattened) tensors, float64, in one blocked pass."""
    a, b = blocks.flat(a), blocks.flat(b)
    aa = bb = ab = 0.0
    for start, stop in blocks.blocks(a.numel(), a.device):
        x, y = a[start:stop].to(torch.float64), b[start:stop].to(torch.float64)
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        ab += float(torch.dot(x, y))
    return aa, bb, ab


def merge_slerp(tensors, model_params, options, base_index, seed, out=None) -> torch.Tensor:
    base, other = tensors[base_index], tensors[1 - base_index]
    t = options["t"]
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    # The whole tensor is one flat vector; normalise only when the norm is not ~0.
    aa, bb, ab = _flat_dots(base, other)
    norm_a = math.sqrt(aa) if math.sqrt(aa) > 1e-8 else 1.0
    norm_b = math.sqrt(bb) if math.sqrt(bb) > 1e-8 else 1.0
    dot = min(1.0, max(-1.0, ab / (norm_a * norm_b)))
    if abs(dot) > 0.9995:  # nearly parallel or anti-parallel: plain lerp
        coef_a, coef_b = 1 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        coef_a, coef_b = math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
    # Both coefficients act on the unnormalised tensors (no magnitude renormalisation):
    # (coef_a * a + coef_b * b) in the work dtype, cast back, one block at a time.
    result = result_tensor(base, out)
    a, b, target = blocks.flat(base), blocks.flat(other), blocks.flat(result)
    size = min(blocks.block_size(base.device), target.numel())
    scaled_a, scaled_b = (torch.empty(size, dtype=work, device=base.device) for _ in range(2))
    for start, stop in blocks.blocks(target.numel(), base.device):
        part_a, part_b = scaled_a[: stop - start], scaled_b[: stop - start]
        torch.mul(a[start:stop].to(work), coef_a, out=part_a)
        torch.mul(b[start:stop].to(work), coef_b, out=part_b)
        target[start:stop].copy_(part_a.add_(part_b))
    return result


def _nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    """Slerp of v0 -> v1 at t, per vector: the whole tensor (flatten), rows of dim 0 (row_wise)
    or the last dim. Norms clamp at 1e-7; (near-)colinear vectors fall back to lerp."""
    shape = v0.shape
    transposed = not flatten and row_wise and v0.dim() >= 2
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif transposed:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    inner_shape = a.shape
    a, b = a.reshape(-1, inner_shape[-1]), b.reshape(-1, inner_shape[-1])
    norm_a = row_dot(a, a).sqrt().clamp(min=1e-7)
    norm_b = row_dot(b, b).sqrt().clamp(min=1e-7)
    cos = (row_dot(a, b) / (norm_a * norm_b)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(colinear, torch.ones_like(cos), torch.sin(theta))
    coef_a = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    result = coef_a.to(a.dtype).unsqueeze(1) * a + coef_b.to(a.dtype).unsqueeze(1) * b
    result = result.reshape(inner_shape)
    if transposed:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def merge_nuslerp(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    first, second = (i for i in range(len(tensors)) if i != base_index)
    w_first, w_second = model_params[first]["weight"], model_params[second]["weight"]
    total = w_first + w_second
    t = 0.5 if abs(total) < 1e-6 else w_second / total
    kwargs = {"flatten": options["nuslerp_flatten"], "row_wise": options["nuslerp_row_wise"]}
    if base_index is None:
        return _nuslerp_pair(t, tensors[first], tensors[second], **kwargs)
    base = tensors[base_index]
    return base + _nuslerp_pair(t, tensors[first] - base, tensors[second] - base, **kwargs)


def _two_non_base(count: int, base_index: int | None) -> None:
    others = count - (base_index is not None)
    if others != 2:
        raise ValueError(
            f"nuslerp needs exactly 2 non-base models, got {others} ({count} tensors, base_index={base_index})"
        )


SLERP = MethodSpec(
    name="slerp",
    params=(
        Param(
            "t",
            "global",
            valid=ParameterRange(0.0, 1.0, why="0 is the base model, 1 the other model"),
            search=(0.0, 1.0),
            alone=1.0,
            uniform=0.5,
        ),
    ),
    base="required",
    min_models=2,
    max_models=2,
    random=False,
    doc="spherical interpolation from the base (t=0) to the other model (t=1)",
    merge=merge_slerp,
    writes_out=True,
    count_hint=" (a base and one other)",
    # A genome slerps the base with the fine-tune of the largest weight gene.
    searchable=True,
    picks_by="weight",
    parent_rank=7,
)

NUSLERP = MethodSpec(
    name="nuslerp",
    params=(
        Param("weight", "model"),
        Param("nuslerp_row_wise", "global", default=False),
        Param("nuslerp_flatten", "global", default=True),
    ),
    base="optional",
    min_models=2,
    max_models=3,
    random=False,
    doc="spherical interpolation of two models (or their deltas from an optional base) by weight",
    merge=merge_nuslerp,
    count_hint=" (two models, plus an optional base)",
    check_models=_two_non_base,
)

SPECS = (SLERP, NUSLERP)
