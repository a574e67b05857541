"""Path models and their export on the decoder architectures beside Llama: Mistral, Qwen2 (q/k/v
biases), Qwen3 (q/k norms), Gemma (scaled embeddings, (1 + w) norms), Gemma 2 and 3 (sandwich norms: the
fold goes into the output norms) and Phi-3 (fused qkv and gate_up). Tiny random models: a path with a repeated layer and scales generates the same tokens
with and without a KV cache, and its export loads with `from_pretrained` and gives its logits."""

from __future__ import annotations

import pytest
import torch
from families import load_checkpoint

from evomerge.dataflow.export import check_foldable, export_path, path_hash
from evomerge.dataflow.path import LayerPath, PathStep
from evomerge.dataflow.path_model import build_path_model, load_sources
from evomerge.errors import CompatibilityError

# Every decoder architecture a path folds its scales on (pre-norm layers with known output
# projections, or Gemma's sandwich norms). OLMo 2 and OPT run paths, but without scales.
FOLDABLE = [
    "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "falcon", "phi",
    "stablelm", "mixtral", "qwen2_moe",
]  # fmt: skip
PATH = LayerPath((PathStep("a", 0, 1.0), PathStep("b", 1, 0.7), PathStep("b", 1, 1.3), PathStep("a", 2, 0.9)), "a", "a")
IDS = torch.tensor([[1, 5, 9, 3, 7]])


def tiny_sources(model_type: str, root) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if model_type == "falcon":  # head_dim is derived there, and cannot be set
        del settings["head_dim"]
    if model_type == "opt":
        settings.update(ffn_dim=64, word_embed_proj_dim=32)
    config = AutoConfig.for_model(model_type, **settings)
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


@pytest.mark.parametrize("model_type", FOLDABLE)
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
    exported.save_pretrained(tmp_path / "resaved")  # the export holds what transformers itself writes
    assert load_checkpoint(tmp_path / "out").keys() == load_checkpoint(tmp_path / "resaved").keys()
    recipe = (tmp_path / "out" / "mergekit_config.yml").read_text()
    if model_type.startswith("gemma") and model_type != "gemma":  # the fold is in (1 + w) output norms
        assert "cannot express" in recipe and "filter:" not in recipe
    else:
        assert recipe.count("filter:") >= 2 and "cannot express" not in recipe


@pytest.mark.parametrize("model_type", ["olmo2", "opt"])
def test_a_layer_without_a_known_fold_runs_unscaled_and_refuses_a_scale(model_type, tmp_path):
    """OLMo 2 is post-norm (its blocks read the raw stream); OPT's MLP is not a block of its own."""
    from transformers import AutoModelForCausalLM

    sources = tiny_sources(model_type, tmp_path)
    plain = LayerPath(tuple(PathStep(step.model, step.layer) for step in PATH.steps), "a", "a")
    export_path(plain, sources, tmp_path / "out", expected_hash=path_hash(plain, sources))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, build_path_model(plain, sources)(IDS).logits)
    with pytest.raises(ValueError, match=r"b layer 1: its step scale cannot be folded .* genome.scale: none"):
        path_hash(PATH, sources)
    with pytest.raises(CompatibilityError, match=r"a layer 0: its step scale cannot be folded"):
        check_foldable(sources)  # what a dataflow worker checks before the first trial
    check_foldable(tiny_sources("mistral", tmp_path / "mistral"))


def test_a_sandwich_layer_folds_into_its_output_norms_not_o_proj(tmp_path):
    from evomerge.dataflow.export import path_state_dict

    sources = tiny_sources("gemma2", tmp_path)
    tensors = path_state_dict(PATH, sources)
    assert [fold is None for fold in tensors.folds] == [True, False, False, False]
    factor = PATH.fold_factors()[1]
    source = tensors.source_tensor("model.layers.1.post_feedforward_layernorm.weight")
    folded = tensors["model.layers.1.post_feedforward_layernorm.weight"]
    torch.testing.assert_close(folded, (1 + source) * factor - 1)  # Gemma's gain is 1 + w
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(tensors[o_proj], tensors.source_tensor(o_proj))
