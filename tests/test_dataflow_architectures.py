"""Path models and their export on the decoder architectures beside Llama: Mistral, Qwen2 (q/k/v
biases), Qwen3 (q/k norms), Gemma (scaled embeddings, (1 + w) norms) and Phi-3 (fused qkv and
gate_up). Tiny random models: a path with a repeated layer and scales generates the same tokens
with and without a KV cache, and its export loads with `from_pretrained` and gives its logits."""

from __future__ import annotations

import pytest
import torch

from evomerge.dataflow.export import export_path, path_hash
from evomerge.dataflow.path import LayerPath, PathStep
from evomerge.dataflow.path_model import build_path_model, load_sources

PATH = LayerPath((PathStep("a", 0, 1.0), PathStep("b", 1, 0.7), PathStep("b", 1, 1.3), PathStep("a", 2, 0.9)), "a", "a")
IDS = torch.tensor([[1, 5, 9, 3, 7]])


def tiny_sources(model_type: str, root) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    folders = {}
    for name in ("a", "b"):
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        folders[name] = root / name
        model.save_pretrained(folders[name])
    return load_sources(folders, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "gemma", "phi3"])
def test_a_path_runs_caches_and_exports_on(model_type, tmp_path, one_torch_thread):
    from transformers import AutoModelForCausalLM

    sources = tiny_sources(model_type, tmp_path)
    model = build_path_model(PATH, sources)
    with torch.no_grad():
        logits = model(IDS).logits
        cached = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    export_path(PATH, sources, tmp_path / "out", expected_hash=path_hash(PATH, sources))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        difference = (exported(IDS).logits - logits).abs().max()
    assert difference <= 1e-3 * logits.abs().max()  # the norms' epsilon, as in test_dataflow_model.py
