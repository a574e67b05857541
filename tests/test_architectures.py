"""Every common decoder architecture through merge, frankenmerge, search and export (issue 16).

Per architecture, on tiny random models written by transformers' own `save_pretrained`:
a linear merge agrees with mergekit 0.1.5 where mergekit knows the architecture; a frankenmerge
(`slices`) that changes the depth loads with `from_pretrained` with every per-layer config list
extended as the slices chose the layers and the head from the last slice; a 3-trial search
scores resident candidates, its export has the scored hash, and the exported mergekit YAML,
merged again, gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from families import ARCHITECTURES, load_checkpoint, tiny_arch_family
from test_evaluator_table import build_weight_mean, check_weight_mean

from evomerge.cli import main
from evomerge.evaluate.factory import EVALUATORS
from evomerge.evaluate.protocol import EvaluatorKind

pytestmark = pytest.mark.slow

# What mergekit 0.1.5 cannot merge of checkpoints transformers 5 writes, and why.
MERGEKIT_CANNOT = {
    "gpt_neox": "mergekit 0.1.5 requires attention.bias buffers that transformers 5 no longer writes",
    "falcon": "mergekit 0.1.5 knows only Falcon's new decoder layout (ln_attn, ln_mlp)",
    "cohere": "mergekit 0.1.5 knows only Cohere's layout with q/k norms (use_qk_norm)",
}


def run(argv) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def weight_mean_kind(monkeypatch):
    monkeypatch.setitem(EVALUATORS, "weight_mean", EvaluatorKind(build=build_weight_mean, check=check_weight_mean))


def linear_merge_parity(paths: dict[str, Path], out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    from evomerge.config.mergekit_yaml import load_merge_config
    from evomerge.merge.engine import run_merge
    from evomerge.merge.planner import plan_merge

    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(paths["ft1"]), "parameters": {"weight": 0.7}},
            {"model": str(paths["ft2"]), "parameters": {"weight": [0.1, 0.5]}},
        ],
        "dtype": "float32",
    }
    config_path = out / "linear.yml"
    config_path.write_text(yaml.safe_dump(config))
    run_merge(plan_merge(load_merge_config(config_path), config_path=config_path), out / "ours", progress=False)
    mergekit_run(
        MergeConfiguration.model_validate(config),
        str(out / "mergekit"),
        options=MergeOptions(device="cpu", copy_tokenizer=False, quiet=True),
    )
    assert load_checkpoint(out / "ours").keys() == load_checkpoint(paths["ft1"]).keys()  # as transformers wrote them
    # mergekit 0.1.5 writes Mixtral's experts by transformers 5's module names (mlp.experts.gate_up_proj),
    # not as checkpoints hold them: compare the models the two checkpoints load as.
    ours = AutoModelForCausalLM.from_pretrained(out / "ours").state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(out / "mergekit").state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=2e-6, atol=2e-6, msg=name)


def frankenmerge_loads(paths: dict[str, Path], out: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(paths["ft1"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(paths["ft2"]), "layer_range": [1, 3]}]},
        ],
        "dtype": "float32",
    }
    config_path = out / "franken.yml"
    config_path.write_text(yaml.safe_dump(config))
    assert run(["merge", config_path, out / "franken", "-q"]) == 0
    model, info = AutoModelForCausalLM.from_pretrained(out / "franken", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_hidden_layers == 4
    written = json.loads((out / "franken" / "config.json").read_text())
    donor = json.loads((paths["ft1"] / "config.json").read_text())
    chosen = [0, 1, 1, 2]  # the source layer each output layer came from
    for key, value in donor.items():  # the sources have 3 layers: a list of 3 is a per-layer list
        if isinstance(value, list) and len(value) == 3:
            assert written[key] == [value[i] for i in chosen], key
    # the head (and final norm) come from the last slice, the input embeddings from the first
    first, last = load_checkpoint(paths["ft1"]), load_checkpoint(paths["ft2"])
    embeddings = model.get_input_embeddings().weight
    assert any(torch.equal(embeddings, t) for t in first.values()), "the input embeddings come from the first slice"
    if not model.config.get_text_config().tie_word_embeddings:
        head = model.get_output_embeddings().weight
        assert any(torch.equal(head, t) for t in last.values()), "the head comes from the last slice"
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 3]]))


def search_export_round_trip(paths: dict[str, Path], out: Path) -> None:
    search_and_export(paths, out)
    yaml_round_trip(out)


def search_and_export(paths: dict[str, Path], out: Path) -> None:
    space_file = tiny_space(paths, out)
    assert run(["run", space_file, "-q"]) == 0, "the search failed"
    assert run(["export", space_file, out / "export", "-q"]) == 0, "the export failed"  # checks the scored hash


def yaml_round_trip(out: Path) -> None:
    exported = out / "export"
    assert run(["merge", exported / "mergekit_config.yml", out / "reproduced", "-q"]) == 0
    assert load_checkpoint(out / "reproduced").keys() == load_checkpoint(exported).keys()
    for name, tensor in load_checkpoint(exported).items():
        assert torch.equal(load_checkpoint(out / "reproduced")[name], tensor), name


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def family(request, tmp_path_factory):
    return request.param, tiny_arch_family(request.param, tmp_path_factory.mktemp(request.param))


def test_linear_merge_matches_mergekit(family, tmp_path):
    architecture, paths = family
    pytest.importorskip("mergekit.merge")
    if architecture in MERGEKIT_CANNOT:  # mergekit refuses it (when it learns it, this says so)
        with pytest.raises(Exception) as refused:
            linear_merge_parity(paths, tmp_path)
        assert not isinstance(refused.value, AssertionError), refused.value
        return
    linear_merge_parity(paths, tmp_path)


def test_a_frankenmerge_that_changes_depth_loads(family, tmp_path):
    frankenmerge_loads(family[1], tmp_path)


def test_a_three_trial_search_exports_the_scored_weights_and_its_yaml_reproduces_them(
    family, tmp_path, weight_mean_kind
):
    search_export_round_trip(family[1], tmp_path)


def test_checkpoint_tensors_are_views_into_the_loaded_model(family):
    """The resident target maps every checkpoint name onto the loaded module (renamed, fused or
    not): reading gives the checkpoint's tensor, and writing a fine-tune's tensors through it
    gives the model transformers loads from that fine-tune."""
    views_into_loaded_model(family[1])


def views_into_loaded_model(paths: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from evomerge.merge.resident import target_parameters

    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    target = target_parameters(model)
    base, finetune = load_checkpoint(paths["base"]), load_checkpoint(paths["ft1"])
    assert base.keys() <= target.keys()
    for name, tensor in base.items():
        assert torch.equal(target[name], tensor), name
    with torch.no_grad():
        for name, tensor in finetune.items():
            target[name].copy_(tensor)
    expected = AutoModelForCausalLM.from_pretrained(paths["ft1"]).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def tiny_space(paths: dict[str, Path], out: Path) -> Path:
    space = {
        "models": [f"ft1@{paths['ft1']}", f"ft2@{paths['ft2']}"],
        "base_model": f"base@{paths['base']}",
        "dtype": "float32",
        "device": "cpu",
        "genome": {"layer_granularity": 1, "methods": ["task_arithmetic", "ties"], "lambda": [0.5, 1.5]},
        "objectives": [{"task": "weights", "metric": "mean"}],
        "eval": {"kind": "weight_mean"},
        "search": {
            "sampler": "random",
            "seed": 0,
            "n_trials": 3,
            "study_name": "arch",
            "enqueue": [],
            "storage": f"sqlite:///{out}/study.db",
        },  # fmt: skip
    }
    space_file = out / "space.yml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    return space_file


@pytest.mark.parametrize("case", ["unknown model_type", "a tensor the class lacks"])
def test_an_architecture_a_search_cannot_load_is_refused_by_validate_in_one_line(
    case, tmp_path, weight_mean_kind, capsys
):
    from safetensors.torch import save_file

    paths = tiny_arch_family("llama", tmp_path / "family")
    for path in paths.values():
        if case == "unknown model_type":
            config = json.loads((path / "config.json").read_text())
            config.update(model_type="evomerge_unknown", architectures=["EvomergeUnknownForCausalLM"])
            (path / "config.json").write_text(json.dumps(config))
        else:  # what older checkpoints carry: a buffer transformers no longer has
            tensors = load_checkpoint(path)
            tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
            save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    space_file = tiny_space(paths, tmp_path)
    expected = {
        "unknown model_type": "transformers has no causal-LM class for model_type 'evomerge_unknown'",
        "a tensor the class lacks": "LlamaForCausalLM has no parameter for the checkpoint tensor "
        "model.layers.0.self_attn.rotary_emb.inv_freq",
    }[case]
    capsys.readouterr()  # save_pretrained's progress bars
    for command in (["validate"], ["run", "-q"]):
        assert run([*command, space_file]) == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1, error


def test_a_frankenmerge_config_picks_every_per_layer_list_and_leaves_the_others(tmp_path):
    from evomerge.io.checkpoint import write_config

    donor = {
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM", "X"], "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"], "no_rope_layers": [1, 0], "eos_token_id": [1, 2],
        "text_config": {"num_hidden_layers": 2, "layer_types": ["a", "b"]},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(donor))
    (tmp_path / "out").mkdir()
    written = write_config(
        tmp_path, tmp_path / "out", dtype_name="float32", num_hidden_layers=3, layer_origins=[0, 1, 1]
    )
    assert written["num_hidden_layers"] == 3 and written["text_config"]["num_hidden_layers"] == 3
    assert written["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    assert written["no_rope_layers"] == [1, 0, 0] and written["text_config"]["layer_types"] == ["a", "b", "b"]
    assert written["architectures"] == donor["architectures"] and written["eos_token_id"] == [1, 2]


def test_a_tied_source_gives_its_input_embedding_as_the_head_of_an_untied_merge(tmp_path):
    untied = tiny_arch_family("llama", tmp_path / "untied", finetunes=0)["base"]
    tied = tiny_arch_family("llama_tied", tmp_path / "tied", finetunes=0, seed=1)["base"]
    config = {
        "merge_method": "linear",
        "models": [{"model": str(untied), "parameters": {"weight": 0.5}}, {"model": str(tied), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }  # fmt: skip
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    assert run(["merge", tmp_path / "merge.yml", tmp_path / "out", "-q"]) == 0
    merged, a, b = (load_checkpoint(p) for p in (tmp_path / "out", untied, tied))
    assert "lm_head.weight" not in b
    torch.testing.assert_close(
        merged["lm_head.weight"], 0.5 * a["lm_head.weight"] + 0.5 * b["model.embed_tokens.weight"]
    )


@pytest.mark.parametrize(
    ("model_type", "overrides", "embeddings", "head"),
    [
        ("gpt_neox", {}, {"gpt_neox.embed_in.weight"}, "embed_out.weight"),  # named "embed", yet the head
        ("gpt2", {}, {"transformer.wte.weight", "transformer.wpe.weight"}, "transformer.wte.weight"),  # tied
        ("opt", {"ffn_dim": 64}, {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"}, None),
        ("llama", {"tie_word_embeddings": False}, {"model.embed_tokens.weight"}, "lm_head.weight"),
    ],
)
def test_embeddings_and_head_come_from_the_model_class_by_checkpoint_name(model_type, overrides, embeddings, head):
    from families import tiny_config

    from evomerge.merge.layout import split_layers
    from evomerge.merge.structure import config_roles

    roles = config_roles(tiny_config(model_type, **overrides).to_dict())
    assert roles.embeddings == embeddings
    assert roles.output_embedding == (head or "model.decoder.embed_tokens.weight")
    if model_type == "gpt_neox":
        names = ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "embed_out.weight",
                 "gpt_neox.final_layer_norm.weight"]  # fmt: skip
        layout = split_layers(names, embeddings=roles.embeddings)
        assert layout.pre == ("gpt_neox.embed_in.weight",)
        assert layout.post == ("embed_out.weight", "gpt_neox.final_layer_norm.weight")
