"""Shared helpers for tests that need small random-weight checkpoints (no skills needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from evomerge.synthetic import LlamaShape, make_random_family

SMALL = LlamaShape(vocab=96, hidden=32, intermediate=64, layers=4, heads=4, kv_heads=2)


def random_family(root: Path, *, finetunes: int = 2, dtype=torch.float32, seed: int = 0, shape: LlamaShape = SMALL):
    return make_random_family(root, shape=shape, finetunes=finetunes, dtype=dtype, seed=seed)


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
