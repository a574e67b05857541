"""Genome -> plan -> weights: the YAML written for a trial reproduces it, in memory == on disk."""

import random

import pytest
import torch
import yaml
from families import load_checkpoint, random_family

from evomerge.cli import main
from evomerge.config.space import parse_space
from evomerge.dtypes import torch_dtype
from evomerge.errors import ConfigError
from evomerge.genome.parameters import ParameterGenome as Genome
from evomerge.io.hashing import checkpoint_hash, weights_hash
from evomerge.merge.engine import run_merge
from evomerge.merge.resident import ResidentSources, materialize


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return random_family(tmp_path_factory.mktemp("genome"), finetunes=3)


def make_space(family, tmp_path, **genome):
    data = {
        "models": [f"a@{family['ft1']}", f"b@{family['ft2']}", f"c@{family['ft3']}"],
        "base_model": f"base@{family['base']}",
        "dtype": "float32",
        "genome": {"layer_granularity": 2, "filters": ["self_attn"], **genome},
        "objectives": [{"task": "t1"}, {"task": "t2"}],
        "search": {"n_trials": 5},
    }
    return parse_space(data, base_dir=tmp_path, source="space.yml", text=yaml.safe_dump(data))


def random_params(genome, seed):
    rng = random.Random(seed)
    return {
        name: (rng.choice(d.choices) if hasattr(d, "choices") else rng.uniform(d.low, d.high))
        for name, d in genome.distributions().items()
    }


def resident_hash(genome, params):
    plan = genome.plan(params)
    sources = ResidentSources(genome.models, dtype=torch_dtype(genome.space.dtype))
    target = {r.name: torch.zeros(r.shape) for r in plan.tensors}
    materialize(plan, sources, target)
    return weights_hash(target), target


def test_gene_names_and_counts(family, tmp_path):
    genome = Genome(make_space(family, tmp_path, methods=["ties", "dare_ties", "linear"]))
    genes = genome.distributions()
    assert genome.num_groups == 2 and genome.filter_sets == ["self_attn", "all"]
    assert set(n for n in genes if n.endswith(".method")) == {"g0.method", "g1.method"}
    # per (group x filter set) + emb + head: weight and density per model, lambda fixed (not a gene)
    assert "g1.self_attn.b.weight" in genes and "emb.all.c.density" in genes and "head.all.a.weight" in genes
    assert not any(n.endswith("lambda") for n in genes)
    assert len(genes) == 2 + (2 * 2 + 2) * 3 * 2


@pytest.mark.parametrize("methods", [["ties"], ["task_arithmetic"], ["slerp"], ["linear"], ["breadcrumbs_ties"]])
def test_single_method_yaml_matches_mergekit(family, tmp_path, methods):
    mergekit_merge = pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    genome = Genome(
        make_space(family, tmp_path, methods=methods, **({"lambda": [0.5, 1.5]} if methods != ["linear"] else {}))
    )
    params = random_params(genome, 1)
    digest, _ = resident_hash(genome, params)
    text = genome.plan(params).recipe_yaml
    config = tmp_path / "recipe.yml"
    config.write_text(text)
    mergekit_merge.run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(text)),
        str(tmp_path / "mk"),
        options=MergeOptions(device="cpu", copy_tokenizer=False, quiet=True),
    )
    theirs = load_checkpoint(tmp_path / "mk")
    _, ours = resident_hash(genome, params)
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=2e-6, atol=2e-6, msg=name)
    # and evomerge merge of the same YAML gives the identical bits
    assert main_ok(["merge", str(config), str(tmp_path / "ours"), "-q"])
    assert checkpoint_hash(tmp_path / "ours") == digest


def test_multi_method_yaml_reproduces_the_trial(family, tmp_path):
    genome = Genome(make_space(family, tmp_path, methods=["ties", "dare_ties", "slerp"], weight=[-0.5, 1.0]))
    for seed in range(6):
        params = random_params(genome, seed)
        if len({params["g0.method"], params["g1.method"]}) == 2:
            break
    digest, _ = resident_hash(genome, params)
    config = tmp_path / "multi.yml"
    config.write_text(genome.plan(params).recipe_yaml)
    assert len(list(yaml.safe_load_all(config.read_text()))) == 3  # two parts + a passthrough
    assert main_ok(["merge", str(config), str(tmp_path / "out"), "-q"])
    assert checkpoint_hash(tmp_path / "out") == digest
    assert not (tmp_path / "out" / ".evomerge-parts").exists()


def test_in_memory_equals_disk_merge(family, tmp_path):
    genome = Genome(make_space(family, tmp_path, methods=["dare_ties", "della_linear"], density=[0.3, 0.7]))
    params = random_params(genome, 3)
    digest, _ = resident_hash(genome, params)
    run_merge(genome.plan(params), tmp_path / "disk", progress=False, workers=3)
    assert checkpoint_hash(tmp_path / "disk") == digest


def test_parent_and_uniform_seeds_are_exact(family, tmp_path):
    genome = Genome(make_space(family, tmp_path, methods=["ties", "task_arithmetic"], density=[0.2, 1.0]))
    ft1 = load_checkpoint(family["ft1"])
    _, merged = resident_hash(genome, genome.parent_params("a"))
    for name in merged:
        torch.testing.assert_close(merged[name], ft1[name], rtol=1e-6, atol=1e-6)
    _, soup = resident_hash(genome, genome.uniform_params())
    others = [load_checkpoint(family[k]) for k in ("ft1", "ft2", "ft3")]
    for name in soup:
        torch.testing.assert_close(soup[name], sum(o[name] for o in others) / 3, rtol=1e-5, atol=1e-6)


def test_bad_granularity_is_a_config_error(family, tmp_path):
    with pytest.raises(ConfigError, match="genome.layer_granularity: 3 does not divide the 4 layers"):
        Genome(make_space(family, tmp_path, layer_granularity=3))


def main_ok(argv):
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code == 0
    return True


@pytest.mark.skipif(not getattr(yaml, "__with_libyaml__", False), reason="PyYAML without libyaml: only one emitter")
def test_recipe_yaml_is_the_same_from_libyaml_and_pure_python(family, tmp_path, monkeypatch):
    from evomerge.config import mergekit_yaml

    assert issubclass(mergekit_yaml._FlowListDumper, yaml.CSafeDumper)
    documents = []
    original = mergekit_yaml.dump_yaml
    monkeypatch.setattr("evomerge.genome.parameters.dump_yaml", lambda doc: documents.append(doc) or original(doc))
    for methods in (["ties", "dare_ties", "slerp"], ["task_arithmetic", "linear", "breadcrumbs_ties"]):
        genome = Genome(make_space(family, tmp_path, methods=methods, weight=[-0.5, 1.0]))
        for seed in range(20):
            genome.to_yaml(random_params(genome, seed))
        genome.to_yaml(genome.uniform_params())
    documents.append(
        {
            "path": "/models/ünï cöde/x: y",
            "long": "word " * 40,
            "multi": "a\nb",
            "empty": "",
            "yes": "yes",
            "null": None,
            "numbers": [1, 2.5, 1e-20, float("inf"), -0.0, 10**30],
            "flag": True,
            "hash": "#x",
            "dash": "-x",
            "lead": "  x",
        }
    )
    assert len(documents) > 40
    for document in documents:
        assert original(document) == yaml.dump(document, Dumper=mergekit_yaml._PyFlowListDumper, sort_keys=False)


def test_multislerp_searches_beside_ties_and_its_yaml_re_merges(family, tmp_path):
    """multislerp is a genome method (per-model weight genes): a space mixing it with ties builds,
    suggests, plans and merges, and the trial's YAML re-merges to the same weights."""
    optuna = pytest.importorskip("optuna")
    genome = Genome(make_space(family, tmp_path, methods=["multislerp", "ties"]))
    genes = genome.distributions()
    assert genes["g0.method"].choices == ("multislerp", "ties")
    assert {"g0.self_attn.a.weight", "g1.all.c.weight", "g0.all.b.density"} <= set(genes)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    mixed = only_multislerp = None
    for _ in range(40):
        params = genome.suggest(study.ask())
        methods = {params["g0.method"], params["g1.method"]}
        if methods == {"multislerp", "ties"}:
            mixed = mixed or params
        elif methods == {"multislerp"}:
            only_multislerp = only_multislerp or params
    assert mixed and only_multislerp
    for name, params in (("mixed", mixed), ("multislerp", only_multislerp)):
        digest, merged = resident_hash(genome, params)
        assert all(torch.isfinite(tensor).all() for tensor in merged.values())
        config = tmp_path / f"{name}.yml"
        config.write_text(genome.plan(params).recipe_yaml)
        documents = list(yaml.safe_load_all(config.read_text()))
        assert "multislerp" in {document["merge_method"] for document in documents}
        assert main_ok(["merge", str(config), str(tmp_path / name), "-q"])
        assert checkpoint_hash(tmp_path / name) == digest


def test_multislerp_genome_yaml_matches_mergekit(family, tmp_path):
    mergekit_merge = pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    genome = Genome(make_space(family, tmp_path, methods=["multislerp"]))
    params = random_params(genome, 2)
    _, ours = resident_hash(genome, params)
    text = genome.plan(params).recipe_yaml
    mergekit_merge.run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(text)),
        str(tmp_path / "mk"),
        options=MergeOptions(device="cpu", copy_tokenizer=False, quiet=True),
    )
    theirs = load_checkpoint(tmp_path / "mk")
    assert theirs.keys() == ours.keys()
    for name in ours:  # float32: norms and dots summed in float64 here, float32 in mergekit
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6, msg=name)
