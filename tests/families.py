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


# Every architecture the per-architecture suite (tests/test_architectures.py) and the table in
# results/architectures.md cover: a name -> (model_type, config overrides).
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {"tie_word_embeddings": False}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", {}),
    "phi3": ("phi3", {}),
    "phi": ("phi", {}),
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "opt": ("opt", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    "falcon": ("falcon", {}),  # Falcon-7B's layout; falcon_new: Falcon-40B/180B's
    "falcon_new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "tie_word_embeddings": False}),
    "mixtral": ("mixtral", {"num_local_experts": 2, "num_experts_per_tok": 1}),
    "qwen2_moe": (
        "qwen2_moe",
        {
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),  # fmt: skip
    "stablelm": ("stablelm", {}),
    "olmo2": ("olmo2", {}),
}
# More architectures transformers ships, for the table in results/architectures.md (the suite
# keeps to the list above, to stay within the CI budget).
MORE_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "qwen3_moe": ("qwen3_moe", {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32}),
    "phimoe": ("phimoe", {"num_local_experts": 2, "num_experts_per_tok": 1}),
    "granite": ("granite", {}),
    "starcoder2": ("starcoder2", {}),
    "cohere": ("cohere", {}),
    "smollm3": ("smollm3", {}),
    "olmo": ("olmo", {}),
    "glm4": ("glm4", {}),
    "exaone4": ("exaone4", {}),
    "ministral": ("ministral", {}),
    "seed_oss": ("seed_oss", {}),
}
DEMO_TOKENIZER = Path("/work/demo_family/base")


def tiny_config(model_type: str, layers: int = 3, **overrides):
    """A transformers config of `model_type` at test size (hidden 32, vocab 64)."""
    from transformers import AutoConfig

    settings = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if model_type == "falcon":  # head_dim is derived there, and cannot be set
        del settings["head_dim"]
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


def tiny_arch_family(architecture: str, root: Path, *, finetunes: int = 2, seed: int = 0) -> dict[str, Path]:
    """A random base of one architecture and `finetunes` fine-tunes of it (base + small noise),
    each written by `save_pretrained` as transformers writes it, with the demo tokenizer."""
    import shutil

    from transformers import AutoModelForCausalLM

    model_type, overrides = {**ARCHITECTURES, **MORE_ARCHITECTURES}[architecture]
    config = tiny_config(model_type, **overrides)
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        base = {name: torch.randn(p.shape, generator=generator) * 0.2 for name, p in model.named_parameters()}
    paths = {}
    for index in range(finetunes + 1):
        name = "base" if index == 0 else f"ft{index}"
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                noise = torch.randn(parameter.shape, generator=generator) * 0.05 if index else 0
                parameter.copy_(base[parameter_name] + noise)
        paths[name] = Path(root) / name
        model.save_pretrained(paths[name])
        if DEMO_TOKENIZER.is_dir():
            for file in ("tokenizer.json", "tokenizer_config.json"):
                if (DEMO_TOKENIZER / file).is_file():
                    shutil.copyfile(DEMO_TOKENIZER / file, paths[name] / file)
    return paths
