"""mergekit YAML -> MergePlan: resolution rules and validation errors (no tensor math here)."""

import pytest
import torch
from families import SMALL, random_family, write_yaml

from evomerge.config.mergekit_yaml import load_merge_config, parse_setting
from evomerge.errors import CompatibilityError, ConfigError
from evomerge.merge.planner import evaluate_setting, plan_merge


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return random_family(tmp_path_factory.mktemp("family"))


def _plan(tmp_path, text, **kwargs):
    path = write_yaml(tmp_path / "merge.yml", text)
    return plan_merge(load_merge_config(path), config_path=path, **kwargs)


def _recipe(plan, name):
    return next(r for r in plan.tensors if r.name == name)


def test_gradient_and_filter_evaluation():
    grad = parse_setting([0.0, 1.0])
    assert [evaluate_setting(grad, "x", t) for t in (0, 0.5, 1)] == [0.0, 0.5, 1.0]
    three = parse_setting([0, 0.5, 1])
    assert evaluate_setting(three, "x", 0.25) == pytest.approx(0.25)
    cond = parse_setting([{"filter": "mlp", "value": 0.3}, {"value": [0, 1]}])
    assert evaluate_setting(cond, "model.layers.0.mlp.up_proj.weight", 0.7) == 0.3
    assert evaluate_setting(cond, "model.layers.0.self_attn.q_proj.weight", 0.7) == pytest.approx(0.7)
    no_match = parse_setting([{"filter": "mlp", "value": 0.3}])
    assert evaluate_setting(no_match, "attn", 0.0) is None
    assert evaluate_setting(parse_setting(["a", "b", "c"]), "x", 0.6) == "b"  # step function


def test_models_syntax_gradients_per_layer(tmp_path, family):
    plan = _plan(
        tmp_path,
        f"""
merge_method: ties
base_model: {family["base"]}
models:
  - model: {family["ft1"]}
    parameters: {{weight: [0, 1], density: [{{filter: mlp, value: 0.5}}, {{value: 0.9}}]}}
  - model: {family["ft2"]}
    parameters: {{weight: 0.4}}
parameters: {{density: 0.7, normalize: false}}
dtype: bfloat16
""",
    )
    assert plan.num_hidden_layers == SMALL.layers
    assert plan.math_dtype == torch.bfloat16 and plan.out_dtype == torch.bfloat16
    models = list(plan.models)
    assert models[-1] == str(family["base"])  # the base is appended when not listed
    for layer in range(SMALL.layers):
        attn = _recipe(plan, f"model.layers.{layer}.self_attn.q_proj.weight")
        assert attn.base_index == 2
        assert attn.model_params[0]["weight"] == pytest.approx(layer / (SMALL.layers - 1))
        assert attn.model_params[0]["density"] == 0.9
        assert attn.model_params[1] == {"weight": 0.4, "density": 0.7}  # falls back to top-level density
        assert attn.model_params[2] == {}  # the base takes no per-model parameters
        assert attn.global_params["normalize"] is False
        assert _recipe(plan, f"model.layers.{layer}.mlp.up_proj.weight").model_params[0]["density"] == 0.5
    # embeddings and lm_head / final norm sit at t = 0
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert _recipe(plan, name).model_params[0]["weight"] == 0.0
    assert "merge_method: ties" in plan.recipe_yaml


def test_slices_remap_layers_and_take_post_from_last_slice(tmp_path, family):
    plan = _plan(
        tmp_path,
        f"""
merge_method: slerp
base_model: {family["base"]}
slices:
  - sources:
      - {{model: {family["base"]}, layer_range: [0, 2]}}
      - {{model: {family["ft1"]}, layer_range: [0, 2]}}
    parameters: {{t: 0.25}}
  - sources:
      - {{model: {family["base"]}, layer_range: [1, 4]}}
      - {{model: {family["ft2"]}, layer_range: [1, 4]}}
    parameters: {{t: [0, 1]}}
dtype: float32
""",
    )
    assert plan.num_hidden_layers == 5  # 2 + 3 layers, a "frankenmerge"
    first = _recipe(plan, "model.layers.1.mlp.down_proj.weight")
    assert first.inputs[1] == (str(family["ft1"]), "model.layers.1.mlp.down_proj.weight")
    assert first.global_params["t"] == 0.25
    second = _recipe(plan, "model.layers.2.mlp.down_proj.weight")  # output layer 2 = source layer 1
    assert second.inputs == (
        (str(family["base"]), "model.layers.1.mlp.down_proj.weight"),
        (str(family["ft2"]), "model.layers.1.mlp.down_proj.weight"),
    )
    assert second.global_params["t"] == 0.0
    assert _recipe(plan, "model.layers.4.mlp.down_proj.weight").global_params["t"] == 1.0
    head = _recipe(plan, "lm_head.weight")
    assert head.inputs[1][0] == str(family["ft2"]) and head.global_params["t"] == 0.0
    embed = _recipe(plan, "model.embed_tokens.weight")
    assert embed.inputs[1][0] == str(family["ft1"]) and embed.global_params["t"] == 0.25


@pytest.mark.parametrize(
    "body, field, message",
    [
        ("merge_method: tiez\nmodels: [{{model: {ft1}}}]", "merge_method", "did you mean 'ties'"),
        (
            "merge_method: linear\nmodels: [{{model: {ft1}}}, {{model: /nope/model}}]",
            "models.1.model",
            "not a local directory",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {ft1}}}, {{model: {ft2}, parameters: {{weight: 1}}}}]",
            "models.0.parameters",
            "needs parameter 'weight'",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {ft1}, parameters: {{wieght: 1}}}}]",
            "models.0.parameters.wieght",
            "did you mean 'weight'",
        ),
        (
            "merge_method: ties\nmodels: [{{model: {ft1}, parameters: {{weight: 1}}}}]",
            "base_model",
            "needs a base_model",
        ),
        (
            "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\nparameters: {{t: 0.5}}",
            "models",
            "exactly 2 models",
        ),
        ("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {ft1}}}]", "parameters", "needs parameter 't'"),
        (
            "merge_method: linear\nslices:\n  - sources:\n      - {{model: {ft1}, layer_range: [0, 9]}}",
            "slices.0.sources.0.layer_range",
            "outside the model's 4 layers",
        ),
        ("merge_method: linear\nmodels: [{{model: {ft1}}}]\ndtype: int4", "dtype", "expected one of"),
    ],
)
def test_config_errors_name_the_field(tmp_path, family, body, field, message):
    text = body.format(base=family["base"], ft1=family["ft1"], ft2=family["ft2"])
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, text)
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(str(tmp_path / "merge.yml")), line
    assert f": {field}:" in line and message in line, line


def test_incompatible_models_fail_before_merging(tmp_path, family):
    other = random_family(
        tmp_path / "wide", finetunes=0, shape=SMALL.__class__(vocab=100, hidden=32, intermediate=64, layers=4)
    )
    with pytest.raises(CompatibilityError, match="different shapes .*different vocabularies"):
        _plan(
            tmp_path,
            f"merge_method: linear\nmodels: [{{model: {family['ft1']}}}, {{model: {other['base']}}}]\nparameters: {{weight: 1}}",
        )
    deep = random_family(
        tmp_path / "deep", finetunes=0, shape=SMALL.__class__(vocab=96, hidden=32, intermediate=64, layers=6)
    )
    with pytest.raises(ConfigError, match="different layer counts"):
        _plan(
            tmp_path,
            f"merge_method: linear\nmodels: [{{model: {family['ft1']}}}, {{model: {deep['base']}}}]\nparameters: {{weight: 1}}",
        )


def test_hidden_size_mismatch_is_not_called_a_vocabulary_difference(tmp_path, family):
    wide = random_family(
        tmp_path / "wide", finetunes=0, shape=SMALL.__class__(vocab=96, hidden=48, intermediate=64, layers=4)
    )
    with pytest.raises(CompatibilityError) as info:
        _plan(
            tmp_path,
            f"merge_method: linear\nmodels: [{{model: {family['ft1']}}}, {{model: {wide['base']}}}]\nparameters: {{weight: 1}}",
        )
    message = str(info.value)
    assert "different model sizes" in message and "vocabular" not in message, message
    assert f"{family['ft1']}: [96, 32]" in message and f"{wide['base']}: [96, 48]" in message, message


def test_a_missing_tensor_names_the_model_that_lacks_it(tmp_path, family):
    import shutil

    from safetensors.torch import load_file, save_file

    lacking = tmp_path / "lacking"
    shutil.copytree(family["ft2"], lacking)
    tensors = load_file(lacking / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, lacking / "model.safetensors")
    with pytest.raises(CompatibilityError) as info:
        _plan(
            tmp_path,
            f"merge_method: linear\nmodels: [{{model: {family['ft1']}}}, {{model: {lacking}}}]\nparameters: {{weight: 1}}",
        )
    message = str(info.value)
    assert message.startswith(f"{lacking}: layer 1 lacks ['mlp.down_proj.weight'] that {family['ft1']} layer 1 has"), (
        message
    )


def test_a_filter_that_matches_no_tensor_is_one_warning_naming_the_field(tmp_path, family, caplog):
    text = f"""
merge_method: ties
base_model: {family["base"]}
models:
  - model: {family["ft1"]}
    parameters: {{weight: [{{filter: no_such_proj, value: 0.2}}, {{value: 0.5}}], density: 0.5}}
  - model: {family["ft2"]}
    parameters: {{weight: 0.5, density: [{{filter: mlp, value: 0.3}}, {{value: 0.5}}]}}
"""
    with caplog.at_level("WARNING"):
        plan = _plan(tmp_path, text)
    warnings = [r.getMessage() for r in caplog.records if "matches no tensor" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "models.0.parameters.weight.0.filter" in warnings[0] and "no_such_proj" in warnings[0]
    assert _recipe(plan, "model.layers.0.mlp.up_proj.weight") is not None  # still merged: mergekit accepts it
