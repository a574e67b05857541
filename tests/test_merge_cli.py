"""`evomerge merge` end to end on small random checkpoints."""

import json

import pytest
import torch
from cli_in_process import exit_code as _run
from families import load_checkpoint, random_family, write_yaml


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return random_family(tmp_path_factory.mktemp("cli"), finetunes=2)


def test_linear_merge_writes_a_loadable_checkpoint(tmp_path, family):
    config = write_yaml(
        tmp_path / "linear.yml",
        f"""
merge_method: linear
models:
  - {{model: {family["ft1"]}, parameters: {{weight: 0.75}}}}
  - {{model: {family["ft2"]}, parameters: {{weight: 0.25}}}}
dtype: float32
out_dtype: bfloat16
""",
    )
    out = tmp_path / "out"
    assert _run(["merge", str(config), str(out), "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert {"model.safetensors", "config.json", "README.md", "mergekit_config.yml", "generation_config.json"} <= set(
        names
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = load_checkpoint(out)
    a, b = load_checkpoint(family["ft1"]), load_checkpoint(family["ft2"])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, (0.75 * a[name] + 0.25 * b[name]).to(torch.bfloat16)), name
    card = (out / "README.md").read_text()
    assert "linear" in card and "merge_method: linear" in card
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_sharded_output_and_frankenmerge_loads(tmp_path, family):
    config = write_yaml(
        tmp_path / "slices.yml",
        f"""
merge_method: passthrough
slices:
  - sources: [{{model: {family["ft1"]}, layer_range: [0, 3]}}]
  - sources: [{{model: {family["ft2"]}, layer_range: [1, 4]}}]
""",
    )
    out = tmp_path / "out"
    assert _run(["merge", str(config), str(out), "--quiet", "--out-shard-size", "20K"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    merged = load_checkpoint(out)
    assert torch.equal(
        merged["model.layers.5.mlp.up_proj.weight"], load_checkpoint(family["ft2"])["model.layers.3.mlp.up_proj.weight"]
    )


def test_random_masks_are_a_function_of_seed_only(tmp_path, family):
    config = write_yaml(
        tmp_path / "dare.yml",
        f"""
merge_method: dare_ties
base_model: {family["base"]}
models:
  - {{model: {family["ft1"]}, parameters: {{weight: 0.6, density: 0.4}}}}
  - {{model: {family["ft2"]}, parameters: {{weight: 0.6, density: 0.6}}}}
""",
    )
    outputs = {}
    for label, extra in [("a", ["--workers", "1"]), ("b", ["--workers", "4"]), ("c", ["--seed", "7"])]:
        assert _run(["merge", str(config), str(tmp_path / label), "--quiet", *extra]) == 0
        outputs[label] = (tmp_path / label / "model.safetensors").read_bytes()
    assert outputs["a"] == outputs["b"]  # thread count and completion order do not matter
    assert outputs["a"] != outputs["c"]  # the seed does


def test_user_mistakes_are_one_line_errors(tmp_path, family, capsys):
    bad = write_yaml(tmp_path / "bad.yml", f"merge_method: ties\nmodels: [{{model: {family['ft1']}}}]\n")
    assert _run(["merge", str(bad), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "base_model" in err and "Traceback" not in err
    assert _run(["merge", str(tmp_path / "missing.yml"), str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err
    good = write_yaml(
        tmp_path / "ok.yml", f"merge_method: linear\nmodels: [{{model: {family['ft1']}, parameters: {{weight: 1}}}}]\n"
    )
    assert _run(["merge", str(good), str(tmp_path / "o2"), "-q"]) == 0
    assert _run(["merge", str(good), str(tmp_path / "o2"), "-q"]) == 2  # refuses to overwrite silently
    assert "--overwrite" in capsys.readouterr().err
    assert _run(["merge", str(good), str(tmp_path / "o3"), "--device", "cuda:0"]) == (
        0 if torch.cuda.is_available() else 2
    )


def test_validate_and_methods_commands(tmp_path, family, capsys):
    good = write_yaml(
        tmp_path / "ok.yml", f"merge_method: linear\nmodels: [{{model: {family['ft1']}, parameters: {{weight: 1}}}}]\n"
    )
    assert _run(["validate", str(good)]) == 0
    assert ": ok (linear" in capsys.readouterr().out
    assert _run(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in (
        "linear",
        "slerp",
        "ties",
        "dare_ties",
        "della",
        "model_stock",
        "breadcrumbs_ties",
        "nuslerp",
        "passthrough",
    ):
        assert name in listing


def test_a_merge_that_overflows_fails_with_the_tensor_named(tmp_path, family, capsys):
    config = write_yaml(
        tmp_path / "overflow.yml",
        f"""
merge_method: linear
models:
  - {{model: {family["ft1"]}, parameters: {{weight: 1.0e+39}}}}
  - {{model: {family["ft2"]}, parameters: {{weight: 1.0}}}}
parameters: {{normalize: false}}
dtype: float32
""",
    )
    assert _run(["merge", str(config), str(tmp_path / "out"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "NaN or Inf" in err and len(err.splitlines()) == 1


def test_the_card_gives_the_command_that_reproduces_the_merge(tmp_path, family, monkeypatch):
    """Run from the output folder, the card's evomerge command (seed included) gives the same bytes."""
    (tmp_path / "recipes").mkdir()
    config = write_yaml(
        tmp_path / "recipes" / "dare.yml",
        f"""
merge_method: dare_ties
base_model: {family["base"]}
models:
  - {{model: {family["ft1"]}, parameters: {{weight: 0.6, density: 0.4}}}}
  - {{model: {family["ft2"]}, parameters: {{weight: 0.6, density: 0.6}}}}
""",
    )
    out = tmp_path / "out"
    assert _run(["merge", str(config), str(out), "--quiet", "--seed", "7"]) == 0
    card = (out / "README.md").read_text()
    command = card.split("From this folder: `")[1].split("`")[0]
    assert command == "evomerge merge mergekit_config.yml ../reproduced --seed 7"
    assert "base_model_relation: merge" in card and "base_model:" not in card.split("---")[1]
    monkeypatch.chdir(out)
    assert _run(command.split()[1:] + ["--quiet"]) == 0
    assert (tmp_path / "reproduced" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_a_mistake_in_a_later_document_is_found_before_any_merging(tmp_path, family, capsys, monkeypatch):
    config = write_yaml(
        tmp_path / "multi.yml",
        f"""
name: part
merge_method: linear
models:
  - {{model: {family["ft1"]}, parameters: {{weight: 0.5}}}}
  - {{model: {family["ft2"]}, parameters: {{weight: 0.5}}}}
dtype: float32
---
merge_method: ties
base_model: {family["base"]}
models:
  - {{model: part, parameters: {{weight: 1.0, density: abc}}}}
dtype: float32
""",
    )
    import evomerge.merge.oneshot as oneshot

    written = []
    monkeypatch.setattr(oneshot, "write_checkpoint", lambda *a, **k: written.append(a))
    assert _run(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "density" in err and len(err.strip().splitlines()) == 1
    assert written == [], "the first document was merged before the second was checked"
    assert not (tmp_path / "out").exists()


def test_methods_lists_all_twenty_and_an_input_rule_is_a_config_error(tmp_path, family, capsys):
    from evomerge.merge.methods import METHODS

    assert _run(["methods"]) == 0
    listing = capsys.readouterr().out
    mergekit_methods = [name for name, spec in METHODS.items() if spec.statistic is None]  # + fisher, regmean
    assert len(mergekit_methods) == 20 and all(f"\n{name} " in f"\n{listing}" for name in METHODS)
    # The spec's input-count rule (check_models) refuses the plan up front, naming the field.
    lone = write_yaml(
        tmp_path / "lone.yml",
        f"merge_method: multislerp\nbase_model: {family['base']}\nmodels: [{{model: {family['base']}}}]\n",
    )
    assert _run(["merge", str(lone), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "multislerp needs at least one model besides the base, got only the base" in err
    assert "internal error" not in err and len(err.splitlines()) == 1
