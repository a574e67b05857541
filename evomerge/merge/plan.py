"""MergePlan: what to compute for every output tensor.

One plan type serves everything: a mergekit YAML, a search genome and an export all become a
MergePlan, and the engine executes plans and nothing else. A plan is pure data (no open files),
so it pickles to Ray workers and hashes into a run's provenance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.io.lora import AdapterRef
from evomerge.merge.vocab import Vocabulary


@dataclass(frozen=True)
class TensorRecipe:
    """How to compute one output tensor from the source models."""

    name: str  # output tensor name
    method: str
    inputs: tuple[tuple[str, str], ...]  # (model key, tensor name in that model), config order
    base_index: int | None  # which input is the base model
    model_params: tuple[Mapping[str, Any], ...]  # one per input
    global_params: Mapping[str, Any]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class MergePlan:
    models: Mapping[str, Path | AdapterRef]  # model key -> local checkpoint directory, or (base, LoRA adapter)
    tensors: tuple[TensorRecipe, ...]
    math_dtype: torch.dtype | None  # None: compute in each tensor's stored dtype
    out_dtype: torch.dtype
    config_donor: str  # model key whose config.json the output copies
    tokenizer_donor: str  # model key whose tokenizer files the output copies
    num_hidden_layers: int
    layer_origins: tuple[int, ...] = ()  # the donor layer each output layer came from; empty: the same layer
    seed: int = 0  # DARE/DELLA masks are a pure function of (seed, tensor name)
    recipe_yaml: str = ""  # a mergekit-compatible YAML reproducing this plan
    metadata: Mapping[str, Any] = field(default_factory=dict)
    vocab: Vocabulary | None = None  # differing vocabularies: output vocabulary and row permutations
    # Data methods: model key -> safetensors file of its statistics (evomerge.data_stats), by tensor name.
    statistics: Mapping[str, Path] = field(default_factory=dict)

    @property
    def method_names(self) -> list[str]:
        return sorted({recipe.method for recipe in self.tensors})

    def output_bytes(self) -> int:
        item = torch.empty((), dtype=self.out_dtype).element_size()
        return sum(torch.Size(r.shape).numel() * item for r in self.tensors)
