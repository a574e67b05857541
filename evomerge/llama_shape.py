"""The shape of a small Llama model: its sizes, tensor names and config.json.

One definition for every tiny Llama evomerge builds: the trained demo family (`evomerge.demo`)
and the random-weight families of the tests and benchmarks (`evomerge.synthetic`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evomerge.dtypes import dtype_name

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a small Llama; the defaults are the tiny model the demo family and the tests use."""

    vocab: int = 256
    hidden: int = 64
    intermediate: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    tie_embeddings: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in checkpoint order."""
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
        return sum(math.prod(shape) for _, shape in self.tensors())

    def config_sizes(self) -> dict[str, int]:
        """The sizes under the names Hugging Face's LlamaConfig and config.json give them."""
        return {
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
        }

    def config(self, dtype: torch.dtype) -> dict:
        """A complete config.json for a random-weight checkpoint of this shape."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **self.config_sizes(),
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "dtype": dtype_name(dtype),
            "attention_bias": False,
            "mlp_bias": False,
        }
