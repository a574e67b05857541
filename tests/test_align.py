"""Git Re-Basin (`evomerge align`): permutations keep the function, matching undoes a permutation,
alignment lowers the loss barrier between two models trained from different seeds, and what has
no known permutation structure is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from families import load_checkpoint
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from evomerge.align import align_models, apply_permutations, permutation_spec, permute_tensor, weight_matching
from evomerge.align.run import ALIGNMENT_FILE
from evomerge.align.toy_pair import ToyTask, barrier, interpolation_losses, sequences, toy_config, train
from evomerge.cli import main
from evomerge.errors import CompatibilityError, EvomergeError
from evomerge.io.output_dir import MARKER
from evomerge.merge.oneshot import merge_file

REPO = Path(__file__).resolve().parent.parent
EVOMERGE = Path(sys.executable).with_name("evomerge")
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
ARCHITECTURES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SIZES, num_key_value_heads=2)),
    "llama-tied-mha": (LlamaForCausalLM, LlamaConfig(**SIZES, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-biases": (LlamaForCausalLM, LlamaConfig(**SIZES, num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "mistral": (MistralForCausalLM, MistralConfig(**SIZES, num_key_value_heads=2)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SIZES, num_key_value_heads=2)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SIZES, num_key_value_heads=2, head_dim=16)),
    "gemma": (GemmaForCausalLM, GemmaConfig(**SIZES, num_key_value_heads=2, head_dim=8)),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(**SIZES, num_key_value_heads=2, head_dim=8)),
    "phi3": (Phi3ForCausalLM, Phi3Config(**SIZES, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(**SIZES, num_key_value_heads=2, head_dim=8)),
}


def tiny_model(kind: str, seed: int = 0):
    cls, config = ARCHITECTURES[kind]
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # norms start at 1; make them carry a per-channel pattern too
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def spec_of(model):
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return permutation_spec(model.config.architectures[0], model.config.to_dict(), shapes)


def random_permutations(spec, seed: int) -> dict[str, np.ndarray]:
    """A random permutation of every kind; head permutations move key/value groups and the query heads inside them."""
    rng = np.random.default_rng(seed)
    perms = {}
    for name, size in spec.sizes.items():
        if name.startswith("heads."):
            groups = rng.permutation(size // spec.group)
            perms[name] = np.concatenate([g * spec.group + rng.permutation(spec.group) for g in groups])
        else:
            perms[name] = rng.permutation(size)
    return perms


def permuted_copy(model, perms):
    spec = spec_of(model)
    state = {name: permute_tensor(spec, name, t, perms) for name, t in model.state_dict().items()}
    copy = type(model)(model.config).eval()
    copy.load_state_dict(state)
    return copy


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_a_permuted_model_computes_the_same_function(kind):
    model = tiny_model(kind)
    if kind == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    perms = random_permutations(spec_of(model), seed=1)
    assert all((p != np.arange(len(p))).any() for p in perms.values())
    permuted = permuted_copy(model, perms)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(permuted.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    torch.testing.assert_close(logits(permuted, tokens), logits(model, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_matching_undoes_a_permutation(kind):
    model = tiny_model(kind)
    spec = spec_of(model)
    original = model.state_dict()
    permuted = permuted_copy(model, random_permutations(spec, seed=6)).state_dict()
    result = weight_matching(spec, original, permuted, seed=7)
    assert result.converged and result.objective_after > result.objective_before
    for name, tensor in permuted.items():
        assert torch.equal(permute_tensor(spec, name, tensor, result.perms), original[name]), name


def test_a_reordering_inside_a_head_would_change_the_function():
    """Why only whole heads move: RoPE pairs dimensions inside a head (the check above is not vacuous)."""
    model = tiny_model("llama")
    spec = spec_of(model)
    state = dict(model.state_dict())
    inside = torch.arange(spec.head_dim).roll(1)
    for layer in range(2):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            heads = state[name].reshape(-1, spec.head_dim, state[name].shape[1])
            state[name] = heads[:, inside].reshape(state[name].shape)
    changed = type(model)(model.config).eval()
    changed.load_state_dict(state)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    assert (logits(changed, tokens) - logits(model, tokens)).abs().max() > 1e-3


def evomerge(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EVOMERGE_DEBUG": "", "COLUMNS": "100"}
    return subprocess.run([str(EVOMERGE), *argv], env=env, capture_output=True, text=True, timeout=120)


def test_align_recovers_a_permutation_exactly(tmp_path):
    """B is A with its units shuffled; `evomerge align A B OUT` writes A's weights back, as a loadable checkpoint."""
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "a")
    permuted_copy(model, random_permutations(spec_of(model), seed=2)).save_pretrained(tmp_path / "b")
    result = evomerge("align", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    written, original = load_checkpoint(tmp_path / "out"), load_checkpoint(tmp_path / "a")
    assert written.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    record = json.loads((tmp_path / "out" / ALIGNMENT_FILE).read_text())
    assert record["converged"] and record["objective_after"] > record["objective_before"]
    assert (tmp_path / "out" / MARKER).is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(reloaded, tokens), logits(model, tokens), atol=1e-5, rtol=0)

    with pytest.raises(EvomergeError, match="--overwrite"):
        align_models(tmp_path / "a", tmp_path / "b", tmp_path / "out", progress=False)

    recipe = tmp_path / "merge.yml"  # the aligned model is a merge input: here A and A again
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - {{model: {tmp_path / 'a'}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {tmp_path / 'out'}, parameters: {{weight: 0.5}}}}\ndtype: float32\n"
    )
    merge_file(recipe, tmp_path / "merged", progress=False)
    merged = load_checkpoint(tmp_path / "merged")
    assert all(torch.allclose(merged[name], tensor, atol=1e-7) for name, tensor in original.items())


def test_align_keeps_the_dtype_and_tied_embeddings(tmp_path):
    model = tiny_model("llama-tied-mha")
    model.save_pretrained(tmp_path / "a")
    permuted_copy(model, random_permutations(spec_of(model), seed=4)).save_pretrained(tmp_path / "b")
    for folder in ("a", "b"):  # stored as bfloat16
        weights = {n: t.to(torch.bfloat16) for n, t in load_checkpoint(tmp_path / folder).items()}
        save_file(weights, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
    report = align_models(tmp_path / "a", tmp_path / "b", tmp_path / "out", seed=5, progress=False)
    written, original = load_checkpoint(tmp_path / "out"), load_checkpoint(tmp_path / "a")
    assert "lm_head.weight" not in written and written.keys() == original.keys()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, original[n]) for n, t in written.items())
    assert report.converged and json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"]


def test_alignment_lowers_the_loss_barrier_between_two_seeds(one_torch_thread):
    """Two tiny Llamas trained from different initialisations on the same data: the loss at the
    midpoint of their linear path falls once B is aligned to A (the endpoints do not move)."""
    torch.manual_seed(0)
    task = ToyTask("successor")
    config = toy_config(task, hidden=64, intermediate=256)
    data, held_out = sequences(task, 512, seed=0), sequences(task, 256, seed=1)
    a = {n: t.detach() for n, t in train(config, data, seed=1, steps=150, batch=32, lr=5e-3).state_dict().items()}
    b = {n: t.detach() for n, t in train(config, data, seed=2, steps=150, batch=32, lr=5e-3).state_dict().items()}
    spec = permutation_spec("LlamaForCausalLM", config.to_dict(), {n: tuple(t.shape) for n, t in a.items()})
    result = weight_matching(spec, a, b, seed=0)
    aligned = {name: apply_permutations(spec, name, t, result.perms) for name, t in b.items()}
    alphas = [0.0, 0.5, 1.0]
    before = interpolation_losses(config, a, b, held_out, alphas)
    after = interpolation_losses(config, a, aligned, held_out, alphas)
    assert before[0] < 0.05 and before[2] < 0.05, before  # both models learned the task
    assert after[0] == pytest.approx(before[0]) and after[2] == pytest.approx(before[2], abs=1e-5)
    assert barrier(before) > 0.1, before  # two seeds: a real barrier
    assert barrier(after) < 0.6 * barrier(before), (before, after)


def test_an_architecture_without_a_permutation_structure_is_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    )
    gpt2.save_pretrained(tmp_path / "a")
    gpt2.save_pretrained(tmp_path / "b")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        main(["align", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out")])
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    line = lines[0]
    assert "GPT2LMHeadModel" in line and "LlamaForCausalLM" in line
    assert not (tmp_path / "out").exists()


def test_models_of_different_shapes_are_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "a")
    wider = LlamaConfig(**{**SIZES, "intermediate_size": 96}, num_key_value_heads=2)
    LlamaForCausalLM(wider).save_pretrained(tmp_path / "b")
    with pytest.raises(CompatibilityError, match=r"mlp\..*shape .*96.*one shape"):
        align_models(tmp_path / "a", tmp_path / "b", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "a")
    with pytest.raises(EvomergeError, match="--device cuda:99"):
        align_models(tmp_path / "a", tmp_path / "a", tmp_path / "out", device="cuda:99", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_tensor_outside_the_structure_is_refused():
    shapes = {name: tuple(t.shape) for name, t in tiny_model("llama").state_dict().items()}
    shapes["model.layers.0.mlp.extra.weight"] = (4, 4)
    config = ARCHITECTURES["llama"][1].to_dict()
    with pytest.raises(CompatibilityError, match="mlp.extra.weight"):
        permutation_spec("LlamaForCausalLM", config, shapes)
