"""Checking a merge's inputs and resolving its parameters, driven only by the method's spec.

Every rule comes from the `MethodSpec`: which parameters exist in which scope, their defaults,
which are booleans, the values each may take (`Param.valid`), how many models the method takes
(with `count_hint` for the message and `check_models` for extra rules) and any cross-parameter
rule (`check`). `merge_tensors` and the planner's per-tensor `check_parameters` go through here,
so a plan is refused up front for exactly what a merge would refuse half way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.config.numbers import coerce_number
from evomerge.merge.registry import MethodSpec, get_method
from evomerge.suggest import did_you_mean


def _unknown_param(method: str, name: str, known: Sequence[str], where: str) -> ValueError:
    hint = did_you_mean(name, known)
    return ValueError(f"{method} has no {where} parameter '{name}' (it takes: {', '.join(known) or 'none'}){hint}")


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


def resolve_globals(spec: MethodSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """The method's global parameters: given values coerced, defaults filled, unknown names refused."""
    declared = [param for param in spec.params if param.scope == "global"]
    for name in given:
        if name not in spec.global_params:
            raise _unknown_param(spec.name, name, list(spec.global_params), "global")
    resolved: dict[str, Any] = {}
    for param in declared:
        value = given.get(param.name)
        if value is None:
            if param.required:
                raise ValueError(f"{spec.name} needs global parameter '{param.name}'")
            value = param.default
        resolved[param.name] = (
            _as_bool(spec.name, param.name, value) if param.is_bool else _as_float(spec.name, param.name, value)
        )
    return resolved


def resolve_model_params(
    spec: MethodSpec, given: Sequence[Mapping[str, Any]], count: int, base_index: int | None
) -> list[dict[str, float]]:
    """Per model its parameters (the base needs none of the required ones), defaults filled."""
    if len(given) != count:
        raise ValueError(f"{spec.name}: got {len(given)} model_params dicts for {count} tensors")
    declared = [param for param in spec.params if param.scope == "model"]
    resolved = []
    for index, params in enumerate(given):
        for name in params:
            if name not in spec.model_params:
                raise _unknown_param(spec.name, name, list(spec.model_params), "per-model")
        values: dict[str, float] = {}
        for param in declared:
            value = params.get(param.name)
            if value is None:
                if param.required:
                    if index == base_index:
                        continue  # the base never needs per-model parameters
                    raise ValueError(f"{spec.name} needs parameter '{param.name}' for model {index}")
                value = param.default
            values[param.name] = _as_float(spec.name, param.name, value, f" of model {index}")
        resolved.append(values)
    return resolved


def _count_error(spec: MethodSpec, count: int) -> ValueError:
    if spec.max_models == spec.min_models:
        expected = f"exactly {spec.min_models}"
    elif spec.max_models is None:
        expected = f"at least {spec.min_models}"
    else:
        expected = f"{spec.min_models} to {spec.max_models}"
    noun = "model" if spec.max_models == spec.min_models == 1 else "models"
    return ValueError(f"{spec.name} needs {expected} {noun}{spec.count_hint}, got {count}")


def check_inputs(spec: MethodSpec, tensors: Sequence[torch.Tensor], base_index: int | None) -> int | None:
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
    if spec.check_models is not None:
        spec.check_models(count, base_index)
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


def check_method_params(
    spec: MethodSpec, model_params: list[dict[str, float]], options: dict[str, Any], base_index: int | None
) -> None:
    """The method's own cross-parameter rule (`MethodSpec.check`), worded with its name."""
    if spec.check is None:
        return
    try:
        spec.check(model_params, options, base_index)
    except ValueError as exc:
        raise ValueError(f"{spec.name}: {exc}") from None


def check_parameters(
    method: str, model_params: Sequence[Mapping[str, Any]], global_params: Mapping[str, Any], base_index: int | None
) -> None:
    """Validate one tensor's parameters exactly as `merge_tensors` will (no tensors needed), and
    each value against its declared range (`Param.valid`).

    The planner calls this for every output tensor, so a merge never fails half way on a value
    it could have refused up front. ValueError with a one-line reason.
    """
    spec = get_method(method)
    if spec.check_models is not None:
        spec.check_models(len(model_params), base_index)
    options = resolve_globals(spec, global_params or {})
    resolved = resolve_model_params(spec, list(model_params), len(model_params), base_index)
    for name, value in options.items():
        if not isinstance(value, bool):
            try:
                spec.param(name).valid.check(value)
            except ValueError as exc:
                raise ValueError(f"{spec.name}: parameter '{name}': {exc}") from None
    for index, params in enumerate(resolved):
        for name, value in params.items():
            try:
                spec.param(name).valid.check(value)
            except ValueError as exc:
                raise ValueError(f"{spec.name}: parameter '{name}' of model {index}: {exc}") from None
    check_method_params(spec, resolved, options, base_index)
