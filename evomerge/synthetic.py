"""Random-weight Llama families for tests and benchmarks (no training, no tokenizer skills).

A base with random weights plus fine-tunes = base + small random task vectors, written as real
Hugging Face checkpoints. Used where only the merge math and I/O matter (parity with
mergekit, speed and memory benchmarks); the skill-bearing demo family lives in evomerge.demo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.io.safetensors_io import StreamingCheckpointWriter


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 256
    hidden: int = 64
    intermediate: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    tie_embeddings: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}"
            names += [
                (f"{p}.input_layernorm.weight", (self.hidden,)),
                (f"{p}.self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (f"{p}.self_attn.k_proj.weight", (kv, self.hidden)),
                (f"{p}.self_attn.v_proj.weight", (kv, self.hidden)),
                (f"{p}.self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (f"{p}.post_attention_layernorm.weight", (self.hidden,)),
                (f"{p}.mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (f"{p}.mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (f"{p}.mlp.down_proj.weight", (self.hidden, self.intermediate)),
            ]
        names.append(("model.norm.weight", (self.hidden,)))
        if not self.tie_embeddings:
            names.append(("lm_head.weight", (self.vocab, self.hidden)))
        return names

    def num_params(self) -> int:
        return sum(torch.Size(shape).numel() for _, shape in self.tensors())

    def config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "dtype": str(dtype).removeprefix("torch."),
            "attention_bias": False,
            "mlp_bias": False,
        }


def _write_model(path: Path, shape: LlamaShape, tensors: dict[str, torch.Tensor], dtype: torch.dtype, shard_bytes: int) -> None:
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
