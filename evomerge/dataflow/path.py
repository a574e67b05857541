"""A data-flow path: which source layers a token passes through, in order, and the scale entering each.

Pure data (frozen, picklable, hashable). The model side (`path_model.py`) runs it in memory and
`export.py` writes it as a checkpoint; both read nothing but this description and the sources.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PathStep:
    """One step: decoder layer `layer` of source `model`, its input hidden state multiplied by `scale`.

    The scale must be positive: RMSNorm maps c*x to sign(c)*norm(x), so only a positive scale can be
    folded into the weights at export (and zero would erase the residual stream).
    """

    model: str
    layer: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"path step: model must be a non-empty name, got {self.model!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"path step {self.model}: layer must be an integer >= 0, got {self.layer!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"path step {self.model}.{self.layer}: scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"path step {self.model}.{self.layer}: scale must be finite and > 0, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))

    def text(self) -> str:
        """`model:layer*scale`, the scale in Python's shortest round-trip form."""
        return f"{self.model}:{self.layer}*{self.scale!r}"


@dataclass(frozen=True)
class LayerPath:
    """The decoder layers of a candidate in order, plus where its embeddings and head come from."""

    steps: tuple[PathStep, ...]
    embed_from: str  # the source whose embeddings (and rotary tables) the path uses
    head_from: str  # the source whose final norm and lm_head the path uses

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps:
            raise ValueError("a layer path needs at least one step")
        for step in self.steps:
            if not isinstance(step, PathStep):
                raise ValueError(f"a layer path's steps must be PathStep, got {type(step).__name__}")
        for role in ("embed_from", "head_from"):
            value = getattr(self, role)
            if not isinstance(value, str) or not value:
                raise ValueError(f"layer path: {role} must be a non-empty model name, got {value!r}")

    @property
    def models(self) -> tuple[str, ...]:
        """Every source the path reads, in first-use order (embeddings first, head last)."""
        return tuple(dict.fromkeys([self.embed_from, *(step.model for step in self.steps), self.head_from]))

    def fold_factors(self) -> tuple[float, ...]:
        """1 / P_k per step, P_k the product of the scales up to and including step k (see export.py)."""
        factors, product = [], 1.0
        for step in self.steps:
            product *= step.scale
            factors.append(1.0 / product)
        return tuple(factors)

    def text(self) -> str:
        """A stable one-line form (hashing, logs): `embed=A; A:0*1.0, B:3*0.5; head=B`."""
        return f"embed={self.embed_from}; {', '.join(step.text() for step in self.steps)}; head={self.head_from}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML/JSON: steps as [model, layer, scale] lists."""
        return {
            "embed_from": self.embed_from,
            "head_from": self.head_from,
            "steps": [[step.model, step.layer, step.scale] for step in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerPath:
        steps: Sequence[Any] = data.get("steps") or ()
        return cls(
            steps=tuple(PathStep(*step) for step in steps),
            embed_from=data.get("embed_from"),
            head_from=data.get("head_from"),
        )
