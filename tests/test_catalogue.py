"""The method catalogue: what the genome, the space file and the validator read from the specs."""

import dataclasses

import pytest

from evomerge.config.space import GenomeSpec
from evomerge.merge.methods import METHODS
from evomerge.merge.registry import Param, gene_params, get_method, ranked, register, searchable_methods


def test_searchable_methods_and_their_genes():
    genes = {name: (spec.genes("model"), spec.genes("global")) for name, spec in searchable_methods().items()}
    assert genes == {
        "linear": (("weight",), ()),
        "slerp": (("weight",), ("t",)),  # weight only picks the fine-tune slerp merges with the base
        "task_arithmetic": (("weight",), ("lambda",)),
        "ties": (("weight", "density"), ("lambda",)),
        "dare_linear": (("weight", "density"), ("lambda",)),
        "dare_ties": (("weight", "density"), ("lambda",)),
        "breadcrumbs": (("weight", "density", "gamma"), ("lambda",)),
        "breadcrumbs_ties": (("weight", "density", "gamma"), ("lambda",)),
        "della": (("weight", "density", "epsilon"), ("lambda",)),
        "della_linear": (("weight", "density", "epsilon"), ("lambda",)),
        "model_stock": ((), ()),
        "multislerp": (("weight",), ()),
        "fisher": (("weight",), ()),  # data methods: statistics computed once per worker
        "regmean": ((), ("alpha",)),
    }
    assert "nuslerp" not in genes and "passthrough" not in genes
    for name in ("nearswap", "ram", "ramplus_tl", "sce", "arcee_fusion", "karcher"):  # no per-model weights
        assert name not in genes


def test_gene_ranges_and_seed_preferences():
    assert {name: param.search for name, param in gene_params().items()} == {
        "weight": (0.0, 1.0), "density": (0.1, 1.0), "gamma": 0.01, "epsilon": (0.01, 0.09), "t": (0.0, 1.0), "lambda": 1.0,
        "alpha": (0.0, 1.0),
    }  # fmt: skip
    spec = GenomeSpec()
    assert [spec.gene_range(name) for name in gene_params()] == [
        (0.0, 1.0),
        (0.1, 1.0),
        0.01,
        (0.01, 0.09),
        (0.0, 1.0),
        1.0,
        (0.0, 1.0),
    ]
    assert ranked("parent_rank") == [
        "task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "della_linear", "della", "slerp",
    ]  # fmt: skip
    assert ranked("uniform_rank") == ["task_arithmetic", "linear", "ties", "dare_linear"]


def test_a_gene_means_one_thing_in_every_method():
    other_range = Param("density", "model", default=1.0, search=(0.0, 0.5), alone=1.0, uniform=1.0)
    clash = dataclasses.replace(get_method("ties"), name="ties_narrow", params=(other_range,))
    with pytest.raises(ValueError, match="gene 'density' of ties_narrow differs"):
        register(clash)
    with pytest.raises(ValueError, match="registered twice"):
        register(get_method("ties"))
    assert "ties_narrow" not in METHODS
