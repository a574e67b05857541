"""Merge methods: the tensor math of every mergekit method we support, one output tensor at a time.

Each method is a `MethodSpec` (its parameters with defaults, how it uses the base model, how many
models it takes) in `METHODS`, plus a pure function from source tensors and parameters to the
merged tensor. `merge_tensors` validates the inputs and dispatches. Names, parameters, defaults
and numerics follow mergekit, so a mergekit YAML recipe gives the same weights here.

Conventions (as in mergekit):
* Math happens in the dtype of the inputs (bf16 in, bf16 sums), except `linear`, which
  accumulates in float32, and `slerp`, which works in float32 (both float64 for float64
  inputs, as mergekit 0.1.5); both cast back.
* Methods whose base is "unused" (linear, passthrough) treat every tensor alike: base_index is
  ignored and every source needs its per-model parameters (a base lists a `weight` too).
* Task-vector methods (task_arithmetic, ties, dare_*, breadcrumbs*, della*) share one pipeline:
  deltas vs the base -> per-model sparsify with its own density -> weight -> optional sign
  consensus -> optional normalisation -> lambda -> base + mixed.
* Scalar factors that come from reductions (L1 norms, dot products, cosines) are computed in
  float64, so results do not depend on the thread count.
* Random methods (dare_*, della*) draw from a generator per (seed, model index), never from the
  global RNG: the same seed gives the same bits whatever the order tensors are merged in.
* linear, slerp and the task-vector methods evaluate block by block (`blocks.py`): whole-tensor
  statistics first (norms, cuts, masks), then the elementwise chain per cache-sized block, with
  the same ops in the same order, so the bits equal whole-tensor evaluation.
* On CPU the task-vector methods run as one fused C loop when a C compiler is at hand
  (`native.py`, `fused.c`; EVOMERGE_NATIVE=0 turns it off), bit-identical to the eager chain:
  TIES cuts come from |delta| histograms (kept across trials for resident sources) and the
  entries inside the cut's bucket are settled exactly. tests/test_native.py holds the two together.

Differences from mergekit (deliberate; each is also commented where it happens):
1. breadcrumbs with int(gamma * numel) == 0 keeps the top int(density * numel) magnitudes.
   mergekit 0.1.4 zeroed the whole delta (negative-zero slice bound); 0.1.5 agrees with us.
2. ties/magnitude with int(density * numel) == 0 (density > 0) keeps the largest entry, as
   mergekit 0.1.5 does; 0.1.4 asserted (a crash in the middle of a merge or a search).
3. linear with normalize and |sum of weights| < 1e-8 divides by 1 (the rule the task-vector
   methods use) instead of by ~0, which gives inf/NaN in mergekit.
4. della rows of length 1 keep with probability `density` (mergekit fails on a NaN
   probability), and della keep probabilities stay float32 for bf16 deltas. See `sparsify.py`.
5. Masks come from our own seeded generators, so dare/della masks differ from mergekit's
   (which draw from the global RNG); their distribution and everything else is the same.
6. Sums over the models add in model order into a float32 accumulator (`_model_sum`). That is
   torch.sum(dim=0), mergekit's, for up to 4 models; with 5+ models torch adds the last columns
   of a tensor in another order, so those entries can differ from mergekit in the last bit.
   A fixed order of our own keeps weight hashes independent of torch's reduction internals.
"""

from __future__ import annotations

import array
import difflib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.config.numbers import coerce_number
from evomerge.merge import blocks, native, sparsify

# Elements per float64 reduction chunk (bounds scratch memory on huge tensors).
_CHUNK = 1 << 20


@dataclass(frozen=True)
class MethodSpec:
    name: str
    global_params: dict[str, float | bool | None]  # name -> default; None = required
    model_params: dict[str, float | None]  # per-source: name -> default; None = required (never for the base)
    base: str  # "required" | "optional" | "unused"
    min_models: int  # counting the base when it takes part
    max_models: int | None
    random: bool  # True for methods that draw masks (dare_*, della*)
    doc: str  # one line, for --help listings


# -- registry ------------------------------------------------------------------------------------
def _task_vector_spec(
    name: str, *, normalize: bool, rescale: bool, extra: dict[str, float] | None = None, random: bool, doc: str
) -> MethodSpec:
    return MethodSpec(
        name=name,
        global_params={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        model_params={"weight": None, "density": 1.0, **(extra or {})},
        base="required",
        min_models=1,  # a lone base is returned unchanged, as in mergekit
        max_models=None,
        random=random,
        doc=doc,
    )


_SPECS = (
    MethodSpec(
        name="linear",
        global_params={"normalize": True},
        model_params={"weight": None},
        base="unused",
        min_models=1,
        max_models=None,
        random=False,
        doc="weighted average of the models (a listed base is one more weighted input)",
    ),
    MethodSpec(
        name="slerp",
        global_params={"t": None},
        model_params={},
        base="required",
        min_models=2,
        max_models=2,
        random=False,
        doc="spherical interpolation from the base (t=0) to the other model (t=1)",
    ),
    MethodSpec(
        name="nuslerp",
        global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
        model_params={"weight": None},
        base="optional",
        min_models=2,
        max_models=3,
        random=False,
        doc="spherical interpolation of two models (or their deltas from an optional base) by weight",
    ),
    _task_vector_spec(
        "task_arithmetic", normalize=False, rescale=False, random=False,
        doc="base plus the weighted sum of task vectors (model - base)",
    ),
    _task_vector_spec(
        "ties", normalize=True, rescale=False, random=False,
        doc="TIES: trim task vectors to top-|x| density, elect signs, average the agreeing values",
    ),
    _task_vector_spec(
        "dare_linear", normalize=False, rescale=True, random=True,
        doc="DARE: randomly drop task-vector entries (keep prob. density), rescale, then add",
    ),
    _task_vector_spec(
        "dare_ties", normalize=False, rescale=True, random=True,
        doc="DARE drop and rescale, then TIES sign election",
    ),
    _task_vector_spec(
        "breadcrumbs", normalize=False, rescale=False, extra={"gamma": 0.01}, random=False,
        doc="Model Breadcrumbs: drop the largest (gamma) and smallest task-vector entries, then add",
    ),
    _task_vector_spec(
        "breadcrumbs_ties", normalize=False, rescale=False, extra={"gamma": 0.01}, random=False,
        doc="Model Breadcrumbs sparsification, then TIES sign election",
    ),
    _task_vector_spec(
        "della", normalize=True, rescale=True, extra={"epsilon": 0.15}, random=True,
        doc="DELLA: magnitude-ranked random drop, rescale, then TIES sign election",
    ),
    _task_vector_spec(
        "della_linear", normalize=False, rescale=True, extra={"epsilon": 0.15}, random=True,
        doc="DELLA magnitude-ranked random drop and rescale, then add",
    ),
    MethodSpec(
        name="model_stock",
        global_params={"filter_wise": False},
        model_params={},
        base="required",
        min_models=3,
        max_models=None,
        random=False,
        doc="Model Stock: interpolate the models' mean toward the base by their task-vector angles",
    ),
    MethodSpec(
        name="passthrough",
        global_params={},
        model_params={"scale": 1.0},  # mergekit's default is None (no scaling): the same result
        base="unused",
        min_models=1,
        max_models=1,
        random=False,
        doc="copy one model's tensor, optionally multiplied by `scale`",
    ),
)

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}


def get_method(name: str) -> MethodSpec:
    """The spec of merge method `name`; a ValueError with a suggestion for unknown names."""
    spec = METHODS.get(name)
    if spec is not None:
        return spec
    close = difflib.get_close_matches(str(name), list(METHODS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown merge method '{name}'; expected one of: {', '.join(METHODS)}{hint}")


# -- parameter resolution ------------------------------------------------------------------------
def _unknown_param(method: str, name: str, known: Sequence[str], where: str) -> ValueError:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ValueError(
        f"{method} has no {where} parameter '{name}' (it takes: {', '.join(known) or 'none'}){hint}"
    )


def _as_bool(method: str, name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    raise ValueError(f"{method}: parameter '{name}' must be true or false, got {value!r}")


def _as_float(method: str, name: str, value: Any, where: str = "") -> float:
    """The config files' one coercion of numbers (evomerge.config.numbers), worded for this API."""
    try:
        return coerce_number(value)
    except ValueError as exc:
        reason = "must be finite" if "finite" in str(exc) else "must be a number"
        raise ValueError(f"{method}: parameter '{name}'{where} {reason}, got {value!r}") from None


def _resolve_globals(spec: MethodSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    for name in given:
        if name not in spec.global_params:
            raise _unknown_param(spec.name, name, list(spec.global_params), "global")
    resolved: dict[str, Any] = {}
    for name, default in spec.global_params.items():
        value = given.get(name)
        if value is None:
            if default is None:
                raise ValueError(f"{spec.name} needs global parameter '{name}'")
            value = default
        resolved[name] = (
            _as_bool(spec.name, name, value) if isinstance(default, bool) else _as_float(spec.name, name, value)
        )
    return resolved


def _resolve_model_params(
    spec: MethodSpec, given: Sequence[Mapping[str, Any]], count: int, base_index: int | None
) -> list[dict[str, float]]:
    if len(given) != count:
        raise ValueError(f"{spec.name}: got {len(given)} model_params dicts for {count} tensors")
    resolved = []
    for index, params in enumerate(given):
        for name in params:
            if name not in spec.model_params:
                raise _unknown_param(spec.name, name, list(spec.model_params), "per-model")
        values: dict[str, float] = {}
        for name, default in spec.model_params.items():
            value = params.get(name)
            if value is None:
                if default is None:
                    if index == base_index:
                        continue  # the base never needs per-model parameters
                    raise ValueError(f"{spec.name} needs parameter '{name}' for model {index}")
                value = default
            values[name] = _as_float(spec.name, name, value, f" of model {index}")
        resolved.append(values)
    return resolved


# -- input validation ----------------------------------------------------------------------------
def _count_error(spec: MethodSpec, count: int) -> ValueError:
    hints = {
        "slerp": " (a base and one other)",
        "nuslerp": " (two models, plus an optional base)",
        "model_stock": " (a base and at least 2 others)",
    }
    if spec.max_models == spec.min_models:
        expected = f"exactly {spec.min_models}"
    elif spec.max_models is None:
        expected = f"at least {spec.min_models}"
    else:
        expected = f"{spec.min_models} to {spec.max_models}"
    noun = "model" if spec.max_models == spec.min_models == 1 else "models"
    return ValueError(f"{spec.name} needs {expected} {noun}{hints.get(spec.name, '')}, got {count}")


def _check_inputs(spec: MethodSpec, tensors: Sequence[torch.Tensor], base_index: int | None) -> int | None:
    """Validate counts, base, shapes and devices; return the base index the math should use."""
    count = len(tensors)
    if spec.base == "unused":
        base_index = None  # e.g. linear: a listed base is one more weighted input
    elif base_index is not None and not 0 <= base_index < count:
        raise ValueError(f"{spec.name}: base_index {base_index} is out of range for {count} tensors")
    if spec.base == "required" and base_index is None:
        raise ValueError(f"{spec.name} needs a base model (base_index is None)")
    if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
        raise _count_error(spec, count)
    if spec.name == "nuslerp" and count - (base_index is not None) != 2:
        raise ValueError(
            f"nuslerp needs exactly 2 non-base models, got {count - (base_index is not None)}"
            f" ({count} tensors, base_index={base_index})"
        )
    first = tensors[0]
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{spec.name}: tensor {index} must be a floating-point torch.Tensor, got {kind}")
        if tensor.shape != first.shape:
            shapes = ", ".join(str(list(t.shape)) for t in tensors)
            raise ValueError(f"{spec.name}: tensors must have the same shape, got {shapes}")
        if tensor.device != first.device:
            devices = ", ".join(str(t.device) for t in tensors)
            raise ValueError(f"{spec.name}: tensors must be on the same device, got {devices}")
    return base_index


# -- float64 reductions ----------------------------------------------------------------------------
def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row sum(a * b) of two [rows, cols] tensors, float64, a block of rows at a time."""
    rows, cols = a.shape
    step = max(1, _CHUNK // max(cols, 1))
    parts = [
        (a[start : start + step].to(torch.float64) * b[start : start + step].to(torch.float64)).sum(dim=1)
        for start in range(0, rows, step)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=a.device)


# -- linear / passthrough --------------------------------------------------------------------------
def _result(like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device) if out is None else out


def _linear(tensors, model_params, options, base_index, seed, out=None) -> torch.Tensor:
    first = tensors[0]
    # Accumulate in float32 (float64 for float64 inputs), as mergekit 0.1.5 does, then cast back.
    accumulate = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([params["weight"] for params in model_params], dtype=accumulate, device=first.device)
    # The divisor is the sum of the weights as rounded to the accumulation dtype (mergekit's).
    total = weights.sum()
    # Difference 3: mergekit divides by a ~0 sum here (inf/NaN); we use divisor 1 like GTA.
    divide = options["normalize"] and abs(float(total)) >= 1e-8
    result = _result(first, out)
    sources, target = [blocks.flat(t) for t in tensors], blocks.flat(result)
    scratch = torch.empty(min(blocks.block_size(first.device), target.numel()), dtype=accumulate, device=first.device)
    for start, stop in blocks.blocks(target.numel(), first.device):
        acc = scratch[: stop - start].zero_()
        for source, weight in zip(sources, weights):
            acc.addcmul_(source[start:stop], weight)
        if divide:
            acc.div_(total)
        target[start:stop].copy_(acc)
    return result


def _passthrough(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    scale = model_params[0]["scale"]
    return tensors[0] * scale if scale != 1 else tensors[0].clone()


# -- slerp / nuslerp -------------------------------------------------------------------------------
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


def _slerp(tensors, model_params, options, base_index, seed, out=None) -> torch.Tensor:
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
    result = _result(base, out)
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
    norm_a = _row_dot(a, a).sqrt().clamp(min=1e-7)
    norm_b = _row_dot(b, b).sqrt().clamp(min=1e-7)
    cos = (_row_dot(a, b) / (norm_a * norm_b)).clamp(-1, 1)
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


def _nuslerp(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    first, second = (i for i in range(len(tensors)) if i != base_index)
    w_first, w_second = model_params[first]["weight"], model_params[second]["weight"]
    total = w_first + w_second
    t = 0.5 if abs(total) < 1e-6 else w_second / total
    kwargs = {"flatten": options["nuslerp_flatten"], "row_wise": options["nuslerp_row_wise"]}
    if base_index is None:
        return _nuslerp_pair(t, tensors[first], tensors[second], **kwargs)
    base = tensors[base_index]
    return base + _nuslerp_pair(t, tensors[first] - base, tensors[second] - base, **kwargs)


# -- model stock -----------------------------------------------------------------------------------
def _model_stock(tensors, model_params, options, base_index, seed) -> torch.Tensor:
    base = tensors[base_index]
    others = [tensor for index, tensor in enumerate(tensors) if index != base_index]
    count = len(others)
    shape = base.shape
    if options["filter_wise"] and base.dim() >= 1:
        row_shape = (*shape[:-1], 1)  # one angle per vector along the last dim
        as_rows = lambda x: x.reshape(-1, shape[-1])  # noqa: E731
    else:
        row_shape = (1,) * base.dim()
        as_rows = lambda x: x.reshape(1, -1)  # noqa: E731
    offsets = [as_rows(tensor - base) for tensor in others]
    norms = [_row_dot(offset, offset).sqrt() for offset in offsets]
    cosines = [
        (_row_dot(offsets[i], offsets[j]) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    # |denominator| ~ 0 (opposed task vectors): no finite estimate, keep the base (as mergekit 0.1.5).
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, 1, denominator))
    t = t.to(base.dtype).reshape(row_shape)
    average = others[0].clone()
    for tensor in others[1:]:
        average += tensor
    average /= count
    return t * average + (1 - t) * base


# -- generalized task arithmetic -------------------------------------------------------------------
@dataclass(frozen=True)
class _TaskVectorMethod:
    sparsifier: str | None  # None | "magnitude" | "breadcrumbs" | "dare" | "della"
    consensus: bool  # TIES sign election by weighted mass


_TASK_VECTOR_METHODS = {
    "task_arithmetic": _TaskVectorMethod(None, False),
    "ties": _TaskVectorMethod("magnitude", True),
    "dare_linear": _TaskVectorMethod("dare", False),
    "dare_ties": _TaskVectorMethod("dare", True),
    "breadcrumbs": _TaskVectorMethod("breadcrumbs", False),
    "breadcrumbs_ties": _TaskVectorMethod("breadcrumbs", True),
    "della": _TaskVectorMethod("della", True),
    "della_linear": _TaskVectorMethod("della", False),
}


# Below this many entries a TIES cut comes from torch.kthvalue on the whole tensor: the radix
# histograms' fixed cost (65536 buckets) is larger than the selection itself.
_RADIX_MIN = 1 << 18


@dataclass
class _Trim:
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


def _rescale_factor(trim: _Trim, delta_blocks) -> float | None:
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


def _top_k(density: float, count: int) -> int:
    """How many entries a TIES trim keeps: at least one (mergekit 0.1.4 asserted on k == 0)."""
    return max(1, int(density * count))


def _trivial_trim(kind: str | None, density: float, count: int) -> _Trim | None:
    """The trims decided without looking at the data (keep all, zero all); None otherwise."""
    if kind is None:
        return _Trim()  # task_arithmetic accepts `density` but ignores it, as in mergekit
    if density >= 1 or count == 0 or (kind == "magnitude" and _top_k(density, count) >= count):
        return _Trim()  # delta * 1 (* 1.0): unchanged
    if density <= 0 and kind != "breadcrumbs":  # breadcrumbs keeps signed zeros (delta * 0)
        return _Trim(zero=True)
    return None


def _plan_trim(kind: str | None, source: torch.Tensor, base: torch.Tensor, params, rescale, seed, index) -> _Trim:
    """Pass 1 for one model: what its sparsifier keeps, and the rescale factor."""
    count = base.numel()
    trivial = _trivial_trim(kind, params["density"], count)
    if trivial is not None:
        return trivial
    density = params["density"]
    shape = source.shape
    source, base = blocks.flat(source), blocks.flat(base)

    def delta_blocks():
        for start, stop in blocks.blocks(count, base.device):
            yield source[start:stop] - base[start:stop], start, stop

    if kind == "magnitude" and base.dtype != torch.float64 and count >= _RADIX_MIN:
        k = _top_k(density, count)
        keys = lambda: (delta.abs().to(torch.float32) for delta, _, _ in delta_blocks())  # noqa: E731
        cut, greater, tied = sparsify.top_k_cut(keys, k, single_level=base.dtype == torch.bfloat16)
        trim = _Trim(cut=sparsify.MagnitudeCut(cut, greater, tied, k))
    elif kind == "dare" and base.device.type == "cpu":
        generator = sparsify.make_generator(seed, index, base.device)
        spans = blocks.blocks(count, base.device)
        trim = _Trim(mask=sparsify.dare_mask_blocks(count, density, generator, base.device, spans))
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
        trim = _Trim(mask=mask.reshape(-1))
    if rescale:
        trim.factor = _rescale_factor(trim, delta_blocks)
    return trim


def _combine(flat_base, flat_sources, trims, weights, kind: _TaskVectorMethod, options, divisor, target) -> None:
    """The eager elementwise chain over flat tensors, one cache-sized block at a time: trim,
    weight, optional sign consensus and normalisation, lambda, base + mixed."""
    # One buffer for all deltas of a block (as mergekit stacks them).
    size = min(blocks.block_size(flat_base.device), target.numel())
    scratch = flat_base.new_empty((len(flat_sources), size))
    accumulate = torch.float64 if flat_base.dtype == torch.float64 else torch.float32
    sums = flat_base.new_empty((3, size), dtype=accumulate)
    for start, stop in blocks.blocks(target.numel(), flat_base.device):
        deltas = scratch[:, : stop - start]
        base_block = flat_base[start:stop]
        for row, (source, trim) in enumerate(zip(flat_sources, trims)):
            trim.apply(torch.sub(source[start:stop], base_block, out=deltas[row]), start, stop)
        deltas.mul_(weights)
        if kind.consensus:
            # Majority sign = sign of the total weighted mass (0 counts as +). A pruned entry
            # has sign 0 and never agrees, so it neither contributes nor counts in the divisor.
            # sign(delta) == majority sign <=> where(majority >= 0, delta > 0, delta < 0),
            # in two ops instead of three (0 and NaN never agree either way).
            majority = torch.where(_model_sum(deltas, sums[0]) >= 0, 1.0, -1.0).to(deltas.dtype)
            agrees = torch.sign(deltas) == majority
            mixed = _model_sum(deltas.mul_(agrees), sums[1])
            if options["normalize"]:  # the per-element divisor costs a pass over all deltas
                divisor = _model_sum(weights * agrees, sums[2])
                divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed = _model_sum(deltas, sums[1])
        if options["normalize"]:
            mixed /= divisor
        if options["lambda"] != 1:
            mixed *= options["lambda"]
        torch.add(base_block, mixed, out=target[start:stop])


def _model_sum(rows: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Sum over the model axis in model order, accumulated in float32 (float64 for float64) from
    +0 and rounded to the rows' dtype once: torch.sum(dim=0)'s result for up to 4 models, but an
    order of our own, so the fused kernel can match it bit for bit (torch adds 5+ rows in another
    order on the last columns, which would also tie our hashes to torch's reduction internals)."""
    acc = scratch[: rows.shape[1]].zero_()
    for row in rows:
        acc.add_(row)
    return acc if acc.dtype == rows.dtype else acc.to(rows.dtype)


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


def _mix_weights(kind: _TaskVectorMethod, sources, model_params, options, dtype, device):
    """The models' weights as a column in the math dtype (bf16-rounded for bf16 merges, like
    mergekit), and the normaliser of a merge without sign consensus (None when not normalised)."""
    weights = torch.tensor([model_params[i]["weight"] for i in sources], dtype=dtype, device=device).reshape(-1, 1)
    divisor = None
    if options["normalize"] and not kind.consensus:
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    return weights, divisor


@dataclass
class FusedMerge:
    """The tensor-independent part of a task-vector merge in the fused kernel's terms: validated
    once, then shared by every tensor a plan merges with the same method and parameters."""

    kind: _TaskVectorMethod
    densities: list[float]  # per source model (the base excluded), config order
    weights: list[float]  # rounded to the math dtype
    normalize: bool
    divisor: float  # the normaliser without consensus; 1.0 otherwise
    lam: float
    _trims: dict[int, tuple[list[int], list[int], array.array]] = field(default_factory=dict)

    @functools.cached_property
    def flags(self) -> tuple[int, int]:
        return int(self.kind.consensus), int(self.normalize)

    @functools.cached_property
    def reals(self) -> array.array:
        """The job's float slots (native.merge_reals), without masks to rescale."""
        return native.merge_reals(self.divisor, self.lam, self.weights, None)

    def trims(self, count: int) -> tuple[list[int], list[int], array.array]:
        """Per model the kernel mode for a tensor of `count` entries and the TIES top-k (CUT),
        and both as the job's trim slots. KEEP and ZERO are decided without the data; MASK means
        a mask must be made first."""
        found = self._trims.get(count)
        if found is None:
            modes, ks = [], []
            for density in self.densities:
                trim = _trivial_trim(self.kind.sparsifier, density, count)
                if trim is not None:
                    modes.append(native.ZERO if trim.zero else native.KEEP)
                    ks.append(0)
                elif self.kind.sparsifier == "magnitude":
                    modes.append(native.CUT)
                    ks.append(_top_k(density, count))
                else:
                    modes.append(native.MASK)
                    ks.append(0)
            found = self._trims[count] = (modes, ks, native.trim_slots(modes, ks))
        return found


def _fused_merge(kind, model_params, options, sources, dtype, device) -> FusedMerge:
    weights, divisor = _mix_weights(kind, sources, model_params, options, dtype, device)
    return FusedMerge(
        kind=kind,
        densities=[model_params[i]["density"] for i in sources],
        weights=weights.reshape(-1).float().tolist(),
        normalize=options["normalize"],
        divisor=float(divisor) if divisor is not None else 1.0,
        lam=options["lambda"],
    )


def fused_merge(
    method: str,
    model_params: Sequence[Mapping[str, Any]],
    global_params: Mapping[str, Any],
    base_index: int | None,
    dtype: torch.dtype,
) -> FusedMerge | None:
    """The fused kernel's settings for merging tensors of `dtype` with these parameters: a
    task-vector method (not a rescaled TIES), a base and at least one other model; None
    otherwise. Bad parameters raise the ValueError merge_tensors raises. The caller checks the
    tensors as merge_tensors does, and leaves to it every tensor whose `trims` ask for a mask
    (drawn or computed per tensor in Python)."""
    kind = _TASK_VECTOR_METHODS.get(method)
    count = len(model_params)
    if kind is None or base_index is None or not 0 <= base_index < count or count < 2:
        return None
    spec = get_method(method)
    options = _resolve_globals(spec, global_params or {})
    resolved = _resolve_model_params(spec, list(model_params), count, base_index)
    _check_method_params(spec, resolved, base_index)
    if not _native_eligible(kind, options, dtype, "cpu"):
        return None
    sources = [index for index in range(count) if index != base_index]
    return _fused_merge(kind, resolved, options, sources, dtype, "cpu")


def _native_eligible(kind: _TaskVectorMethod, options, dtype: torch.dtype, device_type: str) -> bool:
    # A rescaled TIES trim needs the kept L1 norm before the fused pass: eager path.
    return not (kind.sparsifier == "magnitude" and options["rescale"]) and native.supports(dtype, device_type)


def _native_task_vectors(kind, tensors, model_params, options, base_index, seed, target, histogram):
    """The fused C kernel (native.py) over the whole tensor, in one call: TIES cuts come from
    |delta| histograms (cached for resident sources), the kernel settles the entries inside each
    cut's bucket exactly itself, and the other sparsifiers hand it their masks."""
    base = tensors[base_index]
    sources = [index for index in range(len(tensors)) if index != base_index]
    settings = _fused_merge(kind, model_params, options, sources, base.dtype, base.device)
    flat_base = blocks.flat(base)
    count = flat_base.numel()
    modes, ks, _ = settings.trims(count)
    flat_sources, masks, factors, histograms = [], [], [], []
    for row, index in enumerate(sources):
        flat = blocks.flat(tensors[index])
        flat_sources.append(flat)
        mask, factor, cut = None, None, None
        if modes[row] == native.CUT:
            cut = histogram(index, lambda s=flat: native.key_histogram(flat_base, s))
        elif modes[row] == native.MASK:
            trim = _plan_trim(kind.sparsifier, tensors[index], base, model_params[index], options["rescale"], seed, index)
            mask, factor = trim.mask, trim.factor
        masks.append(mask)
        factors.append(1.0 if factor is None else factor)  # x * 1.0 == x, bit for bit
        histograms.append(cut)
    batch = native.JobBatch()
    batch.add(
        base.dtype, count, flat_base.data_ptr(), target.data_ptr(), [s.data_ptr() for s in flat_sources],
        settings.weights, modes, ks, masks=[0 if m is None else m.data_ptr() for m in masks], factors=factors,
        histograms=[field for h in histograms for field in (h.raw if h is not None else (0,) * 6)],
        consensus=kind.consensus, normalize=settings.normalize, divisor=settings.divisor, lam=settings.lam,
    )  # fmt: skip
    batch.run()


def _no_cache(index: int, compute: Callable[[], torch.Tensor]) -> sparsify.KeyHistogram:
    return sparsify.KeyHistogram.of(compute())


def _task_vectors(method: str) -> Callable[..., torch.Tensor]:
    kind = _TASK_VECTOR_METHODS[method]

    def merge(tensors, model_params, options, base_index, seed, out=None, histogram=_no_cache) -> torch.Tensor:
        base = tensors[base_index]
        sources = [index for index in range(len(tensors)) if index != base_index]
        result = _result(base, out)
        if not sources or base.numel() == 0:
            return result.copy_(base)
        target = blocks.flat(result)
        if _native_eligible(kind, options, base.dtype, base.device.type):
            _native_task_vectors(kind, tensors, model_params, options, base_index, seed, target, histogram)
            return result
        weights, divisor = _mix_weights(kind, sources, model_params, options, base.dtype, base.device)
        trims = [
            _plan_trim(kind.sparsifier, tensors[i], base, model_params[i], options["rescale"], seed, i) for i in sources
        ]
        flat_sources = [blocks.flat(tensors[i]) for i in sources]
        _combine(blocks.flat(base), flat_sources, trims, weights, kind, options, divisor, target)
        return result

    return merge


# Implementations that write into a caller's `out` tensor (block by block); the others allocate.
_WRITES_OUT = {"linear", "slerp", *_TASK_VECTOR_METHODS}

_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear,
    "slerp": _slerp,
    "nuslerp": _nuslerp,
    "model_stock": _model_stock,
    "passthrough": _passthrough,
    **{name: _task_vectors(name) for name in _TASK_VECTOR_METHODS},
}


def _check_method_params(spec: MethodSpec, model_params: list[dict[str, float]], base_index: int | None) -> None:
    if spec.name in ("della", "della_linear"):
        for index, params in enumerate(model_params):
            if index != base_index:
                try:
                    sparsify.check_della(params["density"], params["epsilon"])
                except ValueError as exc:
                    raise ValueError(f"{spec.name}: {exc} (model {index})") from None
    if "gamma" in spec.model_params:
        for index, params in enumerate(model_params):
            if index != base_index and not 0 <= params["gamma"] <= 1:
                raise ValueError(f"{spec.name}: gamma of model {index} must be in [0, 1], got {params['gamma']:g}")


def check_parameters(
    method: str, model_params: Sequence[Mapping[str, Any]], global_params: Mapping[str, Any], base_index: int | None
) -> None:
    """Validate one tensor's parameters exactly as `merge_tensors` will (no tensors needed).

    The planner calls this for every output tensor, so a merge never fails half way on a value
    it could have refused up front. ValueError with a one-line reason.
    """
    from evomerge.config.numbers import parameter_range

    spec = get_method(method)
    options = _resolve_globals(spec, global_params or {})
    resolved = _resolve_model_params(spec, list(model_params), len(model_params), base_index)
    for name, value in options.items():
        if not isinstance(value, bool):
            try:
                parameter_range(name).check(value)
            except ValueError as exc:
                raise ValueError(f"{spec.name}: parameter '{name}': {exc}") from None
    for index, params in enumerate(resolved):
        for name, value in params.items():
            try:
                parameter_range(name).check(value)
            except ValueError as exc:
                raise ValueError(f"{spec.name}: parameter '{name}' of model {index}: {exc}") from None
    _check_method_params(spec, resolved, base_index)


# -- entry point -----------------------------------------------------------------------------------
def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, Any],
    base_index: int | None,
    seed: int | None = None,
    out: torch.Tensor | None = None,
    cache: DeltaCache | None = None,
    cache_keys: Sequence[Any] | None = None,
) -> torch.Tensor:
    """Merge one output tensor from its source tensors (one per source model, config order).

    Inputs share shape and device; they are cast to the dtype of the base (or of the first
    tensor when no base takes part), which is also the dtype of the result. Missing parameters
    take the method's defaults. `seed` makes random methods reproducible (None means 0); the
    caller derives it per tensor. The result never aliases an input. Bad inputs raise ValueError.
    `out` (contiguous, the result's shape and dtype, aliasing no input) receives the result
    without a full-size temporary: how a search re-merges into a resident model.
    `cache` keeps statistics of the deltas between inputs that never change across calls (resident
    sources), under `cache_keys` (one hashable per tensor naming its content, e.g. (model, name)).
    """
    spec = get_method(method)
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{spec.name} needs at least one tensor, got none")
    base_index = _check_inputs(spec, tensors, base_index)
    options = _resolve_globals(spec, global_params or {})
    resolved = _resolve_model_params(spec, list(model_params), len(tensors), base_index)
    _check_method_params(spec, resolved, base_index)
    dtype = tensors[base_index if base_index is not None else 0].dtype
    tensors = [tensor.to(dtype) for tensor in tensors]
    if out is not None and (out.shape != tensors[0].shape or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"{spec.name}: out must be a contiguous {dtype} tensor of shape {tuple(tensors[0].shape)}")
    implementation = _IMPLEMENTATIONS[spec.name]
    seed = 0 if seed is None else seed
    with torch.no_grad():
        if spec.name in _TASK_VECTOR_METHODS and cache is not None and cache_keys is not None:
            keys = list(cache_keys)

            def histogram(index: int, compute: Callable[[], torch.Tensor]) -> sparsify.KeyHistogram:
                return cache.histogram(DeltaCache.key(keys[index], keys[base_index], dtype), compute)

            return implementation(tensors, resolved, options, base_index, seed, out=out, histogram=histogram)
        if spec.name in _WRITES_OUT:
            return implementation(tensors, resolved, options, base_index, seed, out=out)
        merged = implementation(tensors, resolved, options, base_index, seed)
        return merged if out is None else out.copy_(merged)
