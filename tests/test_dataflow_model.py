"""Layer paths on the demo family: built in memory from the sources' own layers, exported with the
step scales folded into the weights, and the exported checkpoint loaded back with no custom code."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.dataflow.export import export_path, path_hash, path_recipe, path_state_dict
from evomerge.dataflow.path import LayerPath, PathStep
from evomerge.dataflow.path_model import build_path_model, decoder_layers, load_sources
from evomerge.io.hashing import checkpoint_hash

# A path deeper than any source (6 layers from 4-layer models), with a repeated layer (close.1) and
# scales on both sides of 1, taking its head from another model than its embeddings.
MIXED = LayerPath(
    steps=(
        PathStep("base", 0),
        PathStep("close", 1, 0.8),
        PathStep("close", 1, 1.25),
        PathStep("sort", 2, 0.9),
        PathStep("sort", 3),
        PathStep("base", 3, 1.1),
    ),
    embed_from="base",
    head_from="sort",
)
PROMPT = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12]])  # no pad token (id 0)


@pytest.fixture(scope="module")
def sources(demo_family):
    torch.manual_seed(0)
    models = demo_family.models
    return load_sources({name: models[name] for name in ("base", "close", "sort")})


def _logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_path_text_and_validation():
    assert MIXED.text() == (
        "embed=base; base:0*1.0, close:1*0.8, close:1*1.25, sort:2*0.9, sort:3*1.0, base:3*1.1; head=sort"
    )
    assert LayerPath.from_dict(MIXED.to_dict()) == MIXED
    assert MIXED.models == ("base", "close", "sort")
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite and > 0"):
            PathStep("base", 0, bad)
    with pytest.raises(ValueError, match="at least one step"):
        LayerPath((), "base", "base")


def test_repeated_layer_runs_forward(sources, one_torch_thread):
    model = build_path_model(MIXED, sources)
    logits = _logits(model)
    assert logits.shape == (1, PROMPT.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert model.config.num_hidden_layers == 6
    # The scale is applied: the same path without scales gives other logits.
    unscaled = LayerPath(tuple(PathStep(s.model, s.layer) for s in MIXED.steps), "base", "sort")
    assert not torch.allclose(_logits(build_path_model(unscaled, sources)), logits)


def test_generation_with_cache_equals_without(sources, one_torch_thread):
    model = build_path_model(MIXED, sources)
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        cached = model.generate(PROMPT, use_cache=True, **kwargs)
        uncached = model.generate(PROMPT, use_cache=False, **kwargs)
    assert cached.shape[1] == PROMPT.shape[1] + 8
    assert torch.equal(cached, uncached)
    # One cache slot per step (the repeated layer writes two), and a cached step's logits are the
    # full forward's.
    with torch.no_grad():
        prefix = model(PROMPT[:, :-1], use_cache=True)
        assert len(prefix.past_key_values.layers) == len(MIXED.steps)
        assert prefix.past_key_values.get_seq_length() == PROMPT.shape[1] - 1
        step = model(PROMPT[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], _logits(model)[:, -1], rtol=1e-5, atol=1e-5)
    # The shared module's own cache index is restored after each step.
    assert decoder_layers(sources["close"])[1].self_attn.layer_idx == 1


def test_identity_path_is_the_source(sources, one_torch_thread):
    identity = LayerPath(tuple(PathStep("close", i) for i in range(4)), "close", "close")
    assert torch.equal(_logits(build_path_model(identity, sources)), _logits(sources["close"]))
    assert path_hash(identity, sources) == checkpoint_hash(sources["close"].name_or_path)


def test_path_model_copies_no_weights(sources):
    model = build_path_model(MIXED, sources)
    source_tensors = {
        id(tensor): tensor.data_ptr()
        for source in sources.values()
        for tensor in [*source.parameters(), *source.buffers()]
    }
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert id(tensor) in source_tensors and source_tensors[id(tensor)] == tensor.data_ptr(), name
    layers = decoder_layers(model)
    assert layers[1].layer is layers[2].layer is decoder_layers(sources["close"])[1]
    assert model.get_input_embeddings() is sources["base"].get_input_embeddings()
    assert model.lm_head is sources["sort"].lm_head


def _set_norm_eps(models, eps: float) -> list[tuple[torch.nn.Module, float]]:
    """Set every RMSNorm's epsilon; returns what to restore."""
    saved = []
    for model in models:
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                saved.append((module, module.variance_epsilon))
                module.variance_epsilon = eps
    return saved


def test_export_loads_with_the_same_logits_and_hash(sources, tmp_path, one_torch_thread):
    from transformers import AutoModelForCausalLM

    model = build_path_model(MIXED, sources)
    scored_hash = path_hash(MIXED, sources)
    written = export_path(MIXED, sources, tmp_path / "out", expected_hash=scored_hash)
    assert written == scored_hash == checkpoint_hash(tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, trust_remote_code=False)
    assert exported.config.num_hidden_layers == len(MIXED.steps)
    in_memory, loaded = _logits(model), _logits(exported)
    # The fold is exact when RMSNorm's epsilon is 0: only float32 rounding remains.
    saved = _set_norm_eps([*sources.values(), exported], 0.0)
    try:
        torch.testing.assert_close(_logits(exported), _logits(model), rtol=1e-5, atol=1e-5)
    finally:
        for module, eps in saved:
            module.variance_epsilon = eps
    # With eps = 1e-6 each norm's output changes by eps*|P^2 - 1| / (2*mean(x^2)) relative, here
    # <= 1e-6 * 0.4 / (2 * 0.03) ~ 7e-6 (|P^2 - 1| <= 0.4 for these scales; the stream's mean square
    # is >= 0.03 after the first layer, whose P is 1), compounded over 6 layers of 2 norms each and
    # the final norm: ~1e-4 of the logits' scale. 1e-3 of it leaves a 10x margin.
    torch.testing.assert_close(loaded, in_memory, rtol=0, atol=1e-3 * float(in_memory.abs().max()))
    with pytest.raises(ValueError, match="differs from the scored candidate"):
        export_path(MIXED, sources, tmp_path / "again", expected_hash="0" * 32)


def test_recipe_reproduces_the_export(sources, tmp_path):
    from evomerge.merge.oneshot import merge_file

    path = LayerPath(MIXED.steps, embed_from="base", head_from="base")  # passthrough: head from the last slice
    recipe = path_recipe(path, dtype="float32")
    assert "merge_method: passthrough" in recipe and "filter: self_attn.o_proj" in recipe and "Note:" not in recipe
    assert "Note:" in path_recipe(MIXED, dtype="float32")
    written = export_path(path, sources, tmp_path / "out")
    merge_file(tmp_path / "out" / "mergekit_config.yml", tmp_path / "merged", progress=False)
    assert checkpoint_hash(tmp_path / "merged") == written


def test_state_dict_folds_only_the_output_projections(sources):
    state = path_state_dict(MIXED, sources)
    assert len([name for name in state if name.startswith("model.layers.")]) == 6 * 9
    close_1 = decoder_layers(sources["close"])[1]
    # Step 2 (close.1 again): P = 0.8 * 1.25 = 1, so nothing is folded; step 1: P = 0.8.
    unfolded = state["model.layers.2.self_attn.o_proj.weight"]
    assert unfolded.data_ptr() == close_1.self_attn.o_proj.weight.data_ptr()
    torch.testing.assert_close(state["model.layers.1.mlp.down_proj.weight"], close_1.mlp.down_proj.weight / 0.8)
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], close_1.self_attn.q_proj.weight)
    assert torch.equal(state["lm_head.weight"], sources["sort"].lm_head.weight)


def test_unchainable_models_are_one_clear_error(sources):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = sources["base"].config.to_dict()
    config.update(hidden_size=32, head_dim=8)
    wide = LlamaForCausalLM(LlamaConfig(**config)).eval()
    path = LayerPath((PathStep("base", 0), PathStep("narrow", 1)), "base", "base")
    with pytest.raises(
        ValueError, match=r"models 'base' and 'narrow' cannot be chained.*hidden_size \(base: 64, narrow: 32\)"
    ):
        build_path_model(path, {**sources, "narrow": wide})
    with pytest.raises(ValueError, match="has 4 layers, no layer 7"):
        build_path_model(LayerPath((PathStep("base", 7),), "base", "base"), sources)
