"""The `dataflow` genome on the demo family: its spec, its static genes, decoding genes into a
layer path, the parents' seeds, the depth limits as trial failures, and the passthrough YAML."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest

from evomerge.config.space import load_space, parse_space
from evomerge.dataflow.path import LayerPath, PathStep
from evomerge.errors import CompatibilityError, ConfigError, EvomergeError, InvalidPathError
from evomerge.genome.dataflow import DataflowGenome, DataflowGenomeSpec
from evomerge.genome.kinds import make_genome
from evomerge.search.samplers import make_sampler

FINETUNES = ("reverse", "sort", "shift", "close")  # the demo family's fine-tunes, 4 layers each


def space_data(family, genome, *, base=True):
    data = {
        "models": [f"{name}@{family.finetunes[name]}" for name in FINETUNES],
        "objectives": [{"task": "t"}],
        "search": {"n_trials": 2},
        "genome": {"kind": "dataflow", **genome},
    }
    if base:
        data["base_model"] = f"base@{family.base}"
    return data


def genome_of(family, tmp_path, *, base=True, **genome) -> DataflowGenome:
    space = parse_space(space_data(family, genome, base=base), base_dir=tmp_path, source="space.yml")
    return make_genome(space)


def genes(genome, on=(), scales=None, default_scale=1.0):
    """Every gene: the slots in `on` used, the scale genes at `default_scale` unless in `scales`."""
    params = {}
    for name in genome.distributions():
        if name.endswith(".use"):
            params[name] = 1.0 if int(name[len("slot") : -len(".use")]) in on else 0.0
        else:
            params[name] = (scales or {}).get(name, default_scale)
    return params


def steps(*triples) -> tuple[PathStep, ...]:
    return tuple(PathStep(model, layer, scale) for model, layer, scale in triples)


# -- the spec -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("genome", "message"),
    [
        ({"repeats": 0}, r"genome\.repeats: "),
        ({"repeats": "many"}, r"genome\.repeats: expected a whole number"),
        ({"max_depth": 0}, r"genome\.max_depth: "),
        ({"scale": "pair"}, r"genome\.scale: "),
        ({"scale_range": [1.5, 0.5]}, r"genome\.scale_range: expected 0 < low < high"),
        ({"scale_range": [0, 1]}, r"genome\.scale_range: expected 0 < low < high"),
        ({"models": []}, r"genome\.models: list at least one model"),
        ({"models": ["sort", "sort"]}, r"genome\.models: a model is listed twice"),
        ({"min_depth": 5, "max_depth": 4}, r"genome: min_depth 5 is more than max_depth 4"),
        ({"layers": 3}, r"genome\.layers: unknown field"),
        ({"use_rate": 1}, r"genome\.use_rate: "),
        ({"use_rate": 0}, r"genome\.use_rate: "),
        ({"kind": "stacking"}, r"genome\.kind: unknown genome kind \(choose from: parameters, dataflow, moe\)"),
    ],
)
def test_spec_errors_name_the_genome_field(demo_family, tmp_path, genome, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_space(space_data(demo_family, genome), base_dir=tmp_path, source="space.yml")
    assert "\n" not in str(error.value) and "dataflow." not in str(error.value)


def test_use_rate_sets_the_share_of_slots_a_uniform_genome_turns_on(demo_family, tmp_path):
    genome = genome_of(demo_family, tmp_path, models=["sort", "close"], use_rate=0.25)
    assert genome.use_threshold == 0.75
    params = genes(genome, on={1, 2})
    params["slot1.use"], params["slot2.use"], params["slot5.use"] = 0.75, 0.9, 0.7  # 0.7: under the threshold
    assert [(step.model, step.layer) for step in genome.path(params).steps] == [
        ("base", 0), ("sort", 1), ("sort", 2), ("base", 3)
    ]  # fmt: skip


def test_defaults_and_no_merge_methods(demo_family, tmp_path):
    space = parse_space(space_data(demo_family, {}, base=False), base_dir=tmp_path, source="space.yml")
    spec = space.genome
    assert isinstance(spec, DataflowGenomeSpec)
    assert (spec.repeats, spec.fix_ends, spec.min_depth, spec.max_depth) == (1, True, 1, None)
    assert (spec.scale, spec.scale_range) == ("pairs", (0.5, 1.5))
    assert spec.merge_methods() == []  # so no base_model is required


def test_a_space_file_builds_a_dataflow_genome(demo_family, tmp_path):
    path = tmp_path / "dataflow.yml"
    path.write_text(
        f"base_model: base@{demo_family.base}\n"
        f"models: [reverse@{demo_family.finetunes['reverse']}, sort@{demo_family.finetunes['sort']}]\n"
        "genome: {kind: dataflow, repeats: 2, max_depth: 10, scale: per_slot}\n"
        "objectives: [{task: t}]\n"
        "search: {n_trials: 2}\n"
    )
    genome = make_genome(load_space(path))
    assert isinstance(genome, DataflowGenome)
    assert (genome.anchor, genome.eligible, len(genome.slots)) == ("base", ["reverse", "sort"], 16)
    assert genome.outline() == "33 genes: 16 layer slots (8 layers x 2) and 17 scales; paths of 1-10 steps"


# -- validation up front ----------------------------------------------------------------------------
def test_eligible_models_must_be_in_the_space(demo_family, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^genome\.models\.1: 'sorted' is not a model of this space \(choose from: reverse, sort, shift, close, base\); did you mean 'sort'\?$",
    ):
        genome_of(demo_family, tmp_path, models=["base", "sorted"])


def test_layers_that_cannot_be_chained_are_one_error(demo_family, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(demo_family.finetunes["sort"], odd)
    config = json.loads((odd / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": 500000.0}
    (odd / "config.json").write_text(json.dumps(config))
    data = space_data(demo_family, {})
    data["models"][1] = f"sort@{odd}"
    space = parse_space(data, base_dir=tmp_path, source="space.yml")
    with pytest.raises(CompatibilityError, match=r"odd: rope_parameters .* differs from base's .*cannot be chained"):
        make_genome(space)


def test_depth_limits_the_slots_cannot_meet_are_config_errors(demo_family, tmp_path):
    with pytest.raises(
        ConfigError, match=r"genome\.max_depth: 1 is less than the 2 layers fix_ends puts on every path"
    ):
        genome_of(demo_family, tmp_path, max_depth=1)
    with pytest.raises(ConfigError, match=r"genome\.min_depth: 19 is more than the 18 steps the slots allow"):
        genome_of(demo_family, tmp_path, min_depth=19)


# -- the genes -----------------------------------------------------------------------------------
def test_genes_are_static_and_legible(demo_family, tmp_path):
    genome = genome_of(demo_family, tmp_path)
    names = list(genome.distributions())
    assert names == list(genome.distributions())  # the same set, in the same order, every time
    assert names[:16] == [f"slot{i}.use" for i in range(16)]
    scales = names[16:]
    # r = 1: a path visits the stack in order, so only forward pairs (and the fixed ends') exist
    assert "scale.base.0->reverse.0" in scales and "scale.reverse.3->sort.0" in scales
    assert "scale.close.3->base.3" in scales and "scale.base.0->base.3" in scales
    assert "scale.sort.0->reverse.3" not in scales and "scale.sort.1->sort.1" not in scales
    assert len(scales) == len(set(scales)) == 16 + 16 * 15 // 2 + 16 + 1
    assert {(d.low, d.high) for d in genome.distributions().values()} == {(0.0, 1.0), (0.5, 1.5)}


def test_repeats_make_every_pair_a_gene(demo_family, tmp_path):
    genome = genome_of(demo_family, tmp_path, models=["reverse", "sort"], repeats=2, fix_ends=False)
    names = list(genome.distributions())
    assert names[:16] == [f"slot{i}.use" for i in range(16)]
    assert "scale.sort.0->reverse.3" in names and "scale.sort.1->sort.1" in names
    assert len(names) == 16 + 8 * 8


def test_per_slot_and_no_scales(demo_family, tmp_path):
    per_slot = genome_of(demo_family, tmp_path, models=["sort"], scale="per_slot")
    assert list(per_slot.distributions()) == [
        *(f"slot{i}.use" for i in range(4)),
        *(f"slot{i}.scale" for i in range(4)),
        "last.scale",
    ]
    unscaled = genome_of(demo_family, tmp_path, models=["sort"], scale="none")
    assert list(unscaled.distributions()) == [f"slot{i}.use" for i in range(4)]


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "nsga2", "random"])
def test_every_sampler_suggests_decodable_genes(demo_family, tmp_path, sampler):
    genome = genome_of(demo_family, tmp_path, models=["reverse", "sort"], repeats=2)
    distributions = genome.distributions()
    study = optuna.create_study(sampler=make_sampler(sampler, seed=0, options={}))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for _ in range(6):
        trial = study.ask()
        params = genome.suggest(trial)
        assert list(params) == list(distributions)
        assert all(distributions[name].low <= value <= distributions[name].high for name, value in params.items())
        path = genome.path(params)
        assert (path.steps[0].model, path.steps[0].layer) == ("base", 0)
        assert (path.steps[-1].model, path.steps[-1].layer) == ("base", 3)
        study.tell(trial, float(len(path.steps)))


# -- decoding --------------------------------------------------------------------------------------
def test_hand_set_genes_decode_to_their_path(demo_family, tmp_path):
    genome = genome_of(demo_family, tmp_path, models=["reverse", "sort"], repeats=2)
    # slots: 0-3 reverse 0-3, 4-7 sort 0-3, then again: 8-11 reverse 0-3, 12-15 sort 0-3
    scales = {"scale.base.0->reverse.1": 1.25, "scale.reverse.1->sort.2": 0.75, "scale.sort.2->reverse.1": 1.1}
    params = genes(genome, on={1, 6, 9, 14}, scales=scales)
    assert genome.path(params) == LayerPath(
        steps=steps(
            ("base", 0, 1.0),  # entering from the embeddings: unscaled
            ("reverse", 1, 1.25),
            ("sort", 2, 0.75),
            ("reverse", 1, 1.1),  # a layer twice: its second visit, after sort 2
            ("sort", 2, 0.75),  # the pair reverse 1 -> sort 2 again: the same gene
            ("base", 3, 1.0),
        ),
        embed_from="base",
        head_from="base",
    )
    assert genome.describe(params) == "6 steps: base 0, reverse 1, sort 2, reverse 1, sort 2, base 3 (4 scaled)"


def test_without_fixed_ends_or_base_the_first_model_anchors(demo_family, tmp_path):
    genome = genome_of(demo_family, tmp_path, base=False, models=["sort", "close"], fix_ends=False, scale="per_slot")
    params = genes(genome, on={2, 3, 4}, scales={"slot3.scale": 0.9, "slot2.scale": 1.4})
    path = genome.path(params)
    assert path.steps == steps(("sort", 2, 1.0), ("sort", 3, 0.9), ("close", 0, 1.0))
    assert (path.embed_from, path.head_from) == ("sort", "sort")


def test_a_path_outside_the_depth_limits_fails_the_trial_with_its_reason(demo_family, tmp_path):
    free = genome_of(demo_family, tmp_path, models=["sort"], fix_ends=False, min_depth=2, max_depth=3)
    with pytest.raises(InvalidPathError, match=r"^the path is empty: no slot's use gene is 0\.5 or more$"):
        free.path(genes(free))
    with pytest.raises(InvalidPathError, match=r"^the path has 1 steps, fewer than genome\.min_depth 2$"):
        free.path(genes(free, on={0}))
    with pytest.raises(InvalidPathError, match=r"^the path has 4 steps, more than genome\.max_depth 3$"):
        free.path(genes(free, on={0, 1, 2, 3}))
    assert issubclass(InvalidPathError, EvomergeError)
    assert free.describe(genes(free)) == "invalid path (the path is empty: no slot's use gene is 0.5 or more)"
    assert free.describe({}) == "path ?"
    fixed = genome_of(demo_family, tmp_path, max_depth=4)
    with pytest.raises(InvalidPathError, match=r"the path has 5 steps, more than genome\.max_depth 4"):
        fixed.path(genes(fixed, on={0, 5, 10}))


def test_the_use_threshold_is_one_half(demo_family, tmp_path):
    genome = genome_of(demo_family, tmp_path, models=["sort"], scale="none")
    params = {"slot0.use": 0.49, "slot1.use": 0.5, "slot2.use": 0.51, "slot3.use": 0.0}
    assert [(s.model, s.layer) for s in genome.path(params).steps] == [
        ("base", 0),
        ("sort", 1),
        ("sort", 2),
        ("base", 3),
    ]


def test_a_dataflow_genome_has_no_merge_plan(demo_family, tmp_path):
    genome = genome_of(demo_family, tmp_path)
    with pytest.raises(EvomergeError, match="built from genome.path"):
        genome.plan(genes(genome))
    assert genome.uniform_params() is None


# -- seeds -----------------------------------------------------------------------------------------
def test_parent_params_give_the_parents_own_path(demo_family, tmp_path):
    genome = genome_of(demo_family, tmp_path, fix_ends=False, repeats=2)
    for parent in FINETUNES:
        params = genome.parent_params(parent)
        assert list(params) == list(genome.distributions())
        path = genome.path(params)
        assert path.steps == tuple(PathStep(parent, layer, 1.0) for layer in range(4))
    assert genome.parent_params("base") is None  # not eligible


def test_with_fixed_ends_only_the_anchor_is_expressible(demo_family, tmp_path):
    genome = genome_of(demo_family, tmp_path, models=["base", "sort"])
    assert genome.parent_params("sort") is None  # its path would start with base 0
    assert genome.path(genome.parent_params("base")).steps == tuple(PathStep("base", i, 1.0) for i in range(4))
    shallow = genome_of(demo_family, tmp_path, fix_ends=False, max_depth=3)
    assert shallow.parent_params("sort") is None  # 4 layers: deeper than max_depth
    narrow = genome_of(demo_family, tmp_path, fix_ends=False, scale_range=[1.1, 2])
    assert narrow.parent_params("sort") is None  # scale 1 is outside the range


# -- the mergekit YAML -----------------------------------------------------------------------------
def test_to_yaml_is_a_passthrough_with_folded_scales(demo_family, tmp_path):
    import yaml

    genome = genome_of(demo_family, tmp_path, models=["sort", "close"])
    # slots 0-3 sort 0-3, 4-7 close 0-3; path: base 0, sort 1, sort 2, close 3, base 3
    params = genes(genome, on={1, 2, 7}, scales={"scale.sort.2->close.3": 2.0 / 3.0, "scale.close.3->base.3": 0.5})
    text = genome.to_yaml(params)
    assert text.startswith("# Made by evomerge from a layer path")
    document = yaml.safe_load(text)
    assert document["merge_method"] == "passthrough" and document["dtype"] == "float32"
    ranges = [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in document["slices"]]
    paths = {name: str(path) for name, path in demo_family.models.items()}
    assert ranges == [
        (paths["base"], [0, 1]),
        (paths["sort"], [1, 3]),
        (paths["close"], [3, 4]),
        (paths["base"], [3, 4]),
    ]
    folded = [s["sources"][0].get("parameters", {}).get("scale") for s in document["slices"]]
    assert folded[:2] == [None, None]
    # step k's o_proj and down_proj are divided by the product of the scales up to step k
    assert folded[2] == [
        {"filter": "self_attn.o_proj", "value": 1.5},
        {"filter": "mlp.down_proj", "value": 1.5},
        {"value": 1.0},
    ]
    assert folded[3] == [
        {"filter": "self_attn.o_proj", "value": 3.0},
        {"filter": "mlp.down_proj", "value": 3.0},
        {"value": 1.0},
    ]


def path_model(family, path: LayerPath):
    """The path run by hand: the anchor's model holding copies of the path's layers, each scaling the
    hidden state that enters it (a reference for the folded YAML; no cache, so layer indices do not matter)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    sources = {
        name: AutoModelForCausalLM.from_pretrained(family.models[name], dtype=torch.float32)
        for name in {path.embed_from, *(s.model for s in path.steps)}
    }
    model = copy.deepcopy(sources[path.embed_from]).eval()
    layers = []
    for step in path.steps:
        layer = copy.deepcopy(sources[step.model].model.layers[step.layer])

        def scale_input(module, args, kwargs, scale=step.scale):
            if args:
                return (args[0] * scale, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

        layer.register_forward_pre_hook(scale_input, with_kwargs=True)
        layers.append(layer)
    model.model.layers = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    return model


def test_the_folded_yaml_merges_into_the_path_models_logits(demo_family, tmp_path, one_torch_thread):
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.config.mergekit_yaml import load_merge_config
    from evomerge.merge.engine import run_merge
    from evomerge.merge.planner import plan_merge

    genome = genome_of(demo_family, tmp_path, models=["sort", "close"])
    scales = {"scale.base.0->sort.1": 1.3, "scale.sort.2->close.3": 0.6, "scale.close.3->base.3": 1.45}
    params = genes(genome, on={1, 2, 7}, scales=scales)
    recipe = tmp_path / "path.yml"
    recipe.write_text(genome.to_yaml(params))
    run_merge(plan_merge(load_merge_config(recipe), config_path=recipe), tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokens = torch.randint(3, 80, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = path_model(demo_family, genome.path(params))(tokens, use_cache=False).logits
        unscaled = path_model(demo_family, genome.path(genes(genome, on={1, 2, 7})))(tokens, use_cache=False).logits
        logits = merged(tokens, use_cache=False).logits
    assert torch.allclose(logits, expected, atol=1e-3)  # equal up to the norms' epsilon
    assert (unscaled - expected).abs().max() > 0.1  # the scales do change the model


def test_preflight_has_no_tensor_filters_to_check(demo_family, tmp_path):
    from evomerge.preflight import check_filters

    space = parse_space(space_data(demo_family, {}), base_dir=tmp_path, source="space.yml")
    check_filters(space, ["model.embed_tokens.weight"])  # a dataflow genome has no genome.filters
