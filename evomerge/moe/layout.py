"""Where each tensor of the MoE output goes: the names `save_pretrained` of transformers 5 writes.

Mixtral keeps its classic checkpoint names (`block_sparse_moe.experts.E.w1/w2/w3`, `gate`),
which transformers fuses into `mlp.experts.gate_up_proj` / `down_proj` when it loads them;
Qwen2-MoE and Qwen3-MoE write `mlp.experts.E.{gate,up,down}_proj` and `mlp.gate`, Qwen2-MoE
also `mlp.shared_expert.*` and `mlp.shared_expert_gate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # a dense Llama-style MLP, as its checkpoint names them
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# Which dense families each output takes (their MLPs are gate/up/down projections).
INPUT_TYPES = {
    "mixtral": ("llama", "mistral"),
    "qwen2_moe": ("llama", "mistral", "qwen2"),
    "qwen3_moe": ("qwen3",),
}


@dataclass(frozen=True)
class OutputLayout:
    architecture: str  # a key of config.OUTPUT_ARCHITECTURES

    def expert(self, layer: int, expert: int, projection: str) -> str:
        if self.architecture == "mixtral":
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_NAMES[projection]}.weight"
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"

    def router(self, layer: int) -> str:
        block = "block_sparse_moe" if self.architecture == "mixtral" else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    @property
    def has_shared_expert(self) -> bool:
        return self.architecture == "qwen2_moe"

    def shared_expert(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{projection}.weight"

    def shared_router(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def zero_biases(self, layer: int, q_rows: int, kv_rows: int) -> dict[str, tuple[int]]:
        """Qwen2-MoE's attention always has q/k/v biases: zeros where the base has none."""
        if self.architecture != "qwen2_moe":
            return {}
        prefix = f"model.layers.{layer}.self_attn"
        return {
            f"{prefix}.q_proj.bias": (q_rows,),
            f"{prefix}.k_proj.bias": (kv_rows,),
            f"{prefix}.v_proj.bias": (kv_rows,),
        }


def dense_mlp(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.{projection}.weight"


def output_config(architecture: str, base_config: dict, *, experts: int, experts_per_token: int, dtype: torch.dtype):
    """The output's transformers config: the base's, with the MoE fields mergekit-moe sets."""
    import transformers

    settings = {
        k: v for k, v in base_config.items() if k not in ("model_type", "architectures", "transformers_version")
    }
    if architecture == "mixtral":
        config = transformers.MixtralConfig(**settings)
        config.num_local_experts = experts
        config.sliding_window = None
        config.architectures = ["MixtralForCausalLM"]
    else:
        cls = transformers.Qwen2MoeConfig if architecture == "qwen2_moe" else transformers.Qwen3MoeConfig
        config = cls(**settings)
        config.num_experts = experts
        config.decoder_sparse_step = 1
        config.mlp_only_layers = []
        config.moe_intermediate_size = config.intermediate_size
        if architecture == "qwen2_moe":
            config.shared_expert_intermediate_size = config.intermediate_size
            config.sliding_window = None
            config.use_sliding_window = False
        config.architectures = ["Qwen2MoeForCausalLM" if architecture == "qwen2_moe" else "Qwen3MoeForCausalLM"]
    config.num_experts_per_tok = experts_per_token
    if architecture != "mixtral":
        config.norm_topk_prob = True
    config.dtype = dtype
    return config
