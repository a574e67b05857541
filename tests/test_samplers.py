"""The sampler table: the names a space file may give are the table's, and a sampler added to the
table (one factory, one line) is accepted by the schema, its options checked and built."""

from __future__ import annotations

import optuna
import pytest
from test_search_e2e import write_space

from evomerge.config.space import load_space
from evomerge.errors import ConfigError
from evomerge.search import samplers
from evomerge.search.samplers import FACTORIES, SamplerFactory, make_sampler


def space_sampler(space):
    spec = space.search
    return make_sampler(spec.sampler, seed=spec.seed, options=spec.sampler_options, source=space.source_path)


def test_an_unknown_sampler_is_refused_with_the_table_names(tmp_path, demo_family):
    message = r"unknown sampler 'tpee' \(choose from: tpe, cmaes, nsga2, random\); did you mean 'tpe'\?"
    with pytest.raises(ConfigError, match=message):
        load_space(write_space(tmp_path, demo_family, sampler="tpee"))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_sampler_in_the_table_builds_seeded(tmp_path, demo_family, name):
    sampler = space_sampler(load_space(write_space(tmp_path, demo_family, sampler=name)))
    assert isinstance(sampler, samplers.sampler_class(name))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_sampler_added_to_the_table_is_accepted_checked_and_built(tmp_path, demo_family, monkeypatch):
    def qmc(seed, options):
        return optuna.samplers.QMCSampler(seed=seed, **options)

    monkeypatch.setitem(FACTORIES, "qmc", SamplerFactory("QMCSampler", qmc))
    space = load_space(write_space(tmp_path, demo_family, sampler="qmc", sampler_options={"scramble": 1}))
    sampler = space_sampler(space)
    assert isinstance(sampler, optuna.samplers.QMCSampler) and sampler._scramble is True
    typo = load_space(write_space(tmp_path, demo_family, sampler="qmc", sampler_options={"scrambel": True}))
    with pytest.raises(ConfigError, match="the qmc sampler takes no option 'scrambel'.*did you mean 'scramble'"):
        space_sampler(typo)
