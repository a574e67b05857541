"""The weights hash: one digest for the same weights wherever they sit.

A trial records the hash of the model it scored (resident, on CPU or GPU); `export` hashes the
checkpoint it wrote and compares, which proves the exported files are the scored weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from evomerge.dtypes import dtype_name
from evomerge.io.model_dir import ModelDir


def weights_hash(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> str:
    """xxh3-128 of the tensors' names, dtypes, shapes and bytes, in name order.

    The same weights give the same hash whether they sit in a resident model (CPU or GPU) or in
    an exported checkpoint, which is how `export` proves it wrote the model that was scored.
    """
    return _hash_tensors(tensors.__getitem__, names if names is not None else tensors)


def _hash_tensors(get, names: Iterable[str]) -> str:
    """The hash over tensors fetched one at a time (a checkpoint is never held whole)."""
    import xxhash

    digest = xxhash.xxh3_128()
    for name in sorted(names):
        tensor = get(name).detach()
        digest.update(f"{name}|{dtype_name(tensor.dtype)}|{list(tensor.shape)}\n".encode())
        data = tensor.to("cpu").contiguous().reshape(-1)
        if data.numel():
            digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()


def checkpoint_hash(path: Path, names: Iterable[str] | None = None) -> str:
    """weights_hash of a checkpoint directory on disk."""
    model = ModelDir(path)
    try:
        return _hash_tensors(model.get, list(names) if names is not None else list(model.tensors))
    finally:
        model.close()
