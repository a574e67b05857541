"""Random-weight Llama families for tests and benchmarks (no training, no tokenizer skills).

A base with random weights plus fine-tunes = base + small random task vectors, written as real
Hugging Face checkpoints. Used where only the merge math and I/O matter (parity with
mergekit, speed and memory benchmarks); the skill-bearing demo family lives in evomerge.demo.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evomerge.io.safetensors_io import StreamingCheckpointWriter
from evomerge.llama_shape import LlamaShape


def _write_model(
    path: Path, shape: LlamaShape, tensors: dict[str, torch.Tensor], dtype: torch.dtype, shard_bytes: int
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    layout = [(name, dims, dtype) for name, dims in shape.tensors()]
    with StreamingCheckpointWriter(path, layout, max_shard_bytes=shard_bytes) as writer:
        for name, _ in shape.tensors():
            writer.write(name, tensors[name].to(dtype))
    (path / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def make_random_family(
    out_dir: Path,
    *,
    shape: LlamaShape = LlamaShape(),
    finetunes: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    delta_scale: float = 0.02,
    shard_bytes: int = 5 * 10**9,
) -> dict[str, Path]:
    """Write `base` and `ft1..ftN` under out_dir; returns name -> path."""
    out_dir = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    base = {}
    for name, dims in shape.tensors():
        if name.endswith("norm.weight"):
            base[name] = 1.0 + 0.1 * torch.randn(dims, generator=generator)
        else:
            base[name] = torch.randn(dims, generator=generator) * (1.0 / dims[-1] ** 0.5)
    paths = {"base": out_dir / "base"}
    _write_model(paths["base"], shape, base, dtype, shard_bytes)
    for index in range(1, finetunes + 1):
        tuned = {
            name: tensor + delta_scale * tensor.abs().mean() * torch.randn(tensor.shape, generator=generator) * 10
            for name, tensor in base.items()
        }
        paths[f"ft{index}"] = out_dir / f"ft{index}"
        _write_model(paths[f"ft{index}"], shape, tuned, dtype, shard_bytes)
    return paths
