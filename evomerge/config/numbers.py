"""One coercion for every number a user writes, and the type of a merge parameter's valid range.

Both file kinds (a mergekit merge YAML and a search space file) send each numeric value through
`coerce_number`: non-numbers (`abc`, `0.5x`, `50%`, `true`, a list where a scalar goes) and
non-finite values (`.nan`, `.inf`, numbers too large for a float) are refused with a message
the caller prefixes with the file and field. Numeric strings are accepted because YAML 1.1
reads `1e-3` (no dot, no exponent sign) as a string, and mergekit takes such values.

Which values a merge parameter may take is a `ParameterRange` declared with the parameter, in
its method's spec (`evomerge.merge.registry.Param.valid`); the merge YAML check, the space
file's gene ranges and `evomerge methods` all read it there.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator

_NUMBER_TEXT = re.compile(r"[+-]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER_TEXT = re.compile(r"[+-]?\d[\d_]*")
# The largest integer a numeric field takes: seeds and counts go to numpy/optuna/torch as int64.
MAX_INTEGER = 2**63 - 1

log = logging.getLogger("evomerge.config")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (list, tuple)):
        return f"a list {list(value)!r}"
    if isinstance(value, dict):
        return f"a mapping {value!r}"
    if value is None:
        return "nothing (null)"
    return repr(value)


def coerce_number(value: Any, *, integer: bool = False) -> float | int:
    """`value` as a finite float (or an int when `integer`); ValueError with a one-line reason."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        value = float(value)  # numpy scalars, Fraction (library callers)
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected {kind}, got {_describe(value)}")
    if isinstance(value, str):
        text = value.strip()
        if text.lower().lstrip("+-.") in ("nan", "inf", "infinity"):
            raise ValueError(f"expected a finite number, got {value!r}")
        if integer and _INTEGER_TEXT.fullmatch(text):
            value = int(text)
        elif _NUMBER_TEXT.fullmatch(text):
            value = float(text)
        else:
            raise ValueError(f"expected {kind}, got {value!r}")
    if isinstance(value, int):
        if integer:
            if abs(value) > MAX_INTEGER:
                raise ValueError(
                    f"expected a whole number of at most {MAX_INTEGER}, got one with {len(str(abs(value)))} digits"
                )
            return value
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"expected a finite number, got one with {len(str(abs(value)))} digits") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    if integer:
        if not value.is_integer():
            raise ValueError(f"expected a whole number, got {value:g}")
        if abs(value) > MAX_INTEGER:
            raise ValueError(f"expected a whole number of at most {MAX_INTEGER}, got {value:g}")
        return int(value)
    return value


def _finite(value: Any) -> float:
    return coerce_number(value)


def _whole(value: Any) -> int:
    return coerce_number(value, integer=True)


def _optional(convert):
    return lambda value: None if value is None else convert(value)


# pydantic field types for every numeric field of the config files (bounds go in Field(ge=...)).
Number = Annotated[float, BeforeValidator(_finite)]
Integer = Annotated[int, BeforeValidator(_whole)]
OptionalNumber = Annotated[float | None, BeforeValidator(_optional(_finite))]
OptionalInteger = Annotated[int | None, BeforeValidator(_optional(_whole))]


def coerce_bool(value: Any) -> bool:
    """true/false (or 0/1, as mergekit's own configs sometimes write them); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected true or false, got {_describe(value)}")


@dataclass(frozen=True)
class ParameterRange:
    """The values a merge parameter may take: [low, high]; beyond `lenient_high` only a warning.

    `lenient_high` marks values mergekit accepts on purpose (a density above 1 keeps every entry,
    exactly as 1 does); anything else outside [low, high] is refused.
    """

    low: float = -math.inf
    high: float = math.inf
    lenient_high: bool = False
    why: str = ""

    def check(self, value: float) -> str | None:
        """None when `value` is fine; else the problem. Raises ValueError for refused values."""
        if self.low <= value <= self.high:
            return None
        if value > self.high and self.lenient_high:
            return f"{value:g} is above {self.high:g}; {self.why}"
        raise ValueError(
            f"expected a value in [{self.low:g}, {self.high:g}], got {value:g}"
            + (f" ({self.why})" if self.why and not self.lenient_high else "")
        )

    @property
    def bounded(self) -> bool:
        return not (math.isinf(self.low) and math.isinf(self.high))

    def describe(self) -> str:
        if not self.bounded:
            return "any finite number"
        return f"[{self.low:g}, {self.high:g}]"


_WARNED: set[str] = set()  # lines already logged by this process


def config_warning(message: str, *, file: object | None = None, field: str | None = None) -> str:
    """Log a one-line warning about an accepted but unusual value, once per process (a file is
    planned more than once: checked up front, then merged); returns the line."""
    line = ": ".join(str(part) for part in ("warning", file, field, message) if part)
    if line not in _WARNED:
        _WARNED.add(line)
        log.warning(line)
    return line
