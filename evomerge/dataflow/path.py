"""The description of a layer path, shared by the dataflow genome (which decodes genes into one)
and the path model builder and export (which run and write one)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PathStep:
    """One step: the hidden state, multiplied by `scale`, enters layer `layer` of model `model`."""

    model: str  # a model name of the space
    layer: int  # the layer's index in that model
    scale: float  # the factor on the residual stream entering this step (1: unscaled)


@dataclass(frozen=True)
class LayerPath:
    """A candidate: the embeddings of `embed_from`, then `steps` in order, then the final norm and
    lm_head of `head_from`."""

    steps: tuple[PathStep, ...]
    embed_from: str
    head_from: str
