"""Genome kinds: `genome.kind` picks a spec and an implementation from one table, and a kind added
to that table is validated by the space schema and built by the one factory."""

from __future__ import annotations

import sys
import types
from typing import Literal

import pytest
from pydantic import Field, create_model

from evomerge.config import space as space_module
from evomerge.config.base import StrictModel
from evomerge.config.space import parse_space
from evomerge.errors import ConfigError
from evomerge.genome import kinds
from evomerge.genome.kinds import GenomeKind, make_genome
from evomerge.genome.parameters import ParameterGenome
from evomerge.genome.spec import GenomeSpec


def space_data(tmp_path, genome=None):
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir(exist_ok=True)
    data = {
        "models": ["a@a", "b@b"],
        "base_model": "base@base",
        "objectives": [{"task": "t"}],
        "search": {"n_trials": 2},
    }
    if genome is not None:
        data["genome"] = genome
    return data


def test_parameters_is_the_default_kind(tmp_path):
    space = parse_space(space_data(tmp_path), base_dir=tmp_path, source="space.yml")
    assert isinstance(space.genome, GenomeSpec) and space.genome.kind == "parameters"
    explicit = parse_space(space_data(tmp_path, {"kind": "parameters"}), base_dir=tmp_path, source="space.yml")
    assert explicit.genome == space.genome


def test_an_unknown_kind_is_one_line_on_the_field(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_space(space_data(tmp_path, {"kind": "stacking"}), base_dir=tmp_path, source="space.yml")
    assert "genome.kind" in str(error.value) and "\n" not in str(error.value)


class LoopSpec(StrictModel):
    """A second kind for the test: one fixed method, and one gene of its own."""

    kind: Literal["loops"] = "loops"
    repeats: int = 1

    def merge_methods(self) -> list[str]:
        return ["linear"]


class LoopGenome:
    def __init__(self, space, models=None):
        self.space, self.models = space, models


@pytest.fixture
def loop_kind(monkeypatch):
    """Register the kind exactly as a new module would: one line in GENOME_KINDS."""
    module = types.ModuleType("loop_genome_for_test")
    module.LoopGenome = LoopGenome
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(kinds.GENOME_KINDS, "loops", GenomeKind(LoopSpec, f"{module.__name__}:LoopGenome"))
    # The schema reads the table when evomerge.config.space is imported; here, after import, the
    # same field is built again from the table.
    field = (kinds._spec_field(), Field(default_factory=kinds.default_genome_spec))
    schema = create_model("SearchSpace", __base__=space_module.SearchSpace, genome=field)
    monkeypatch.setattr(space_module, "SearchSpace", schema)


def test_a_registered_kind_is_validated_and_built(tmp_path, loop_kind):
    space = parse_space(space_data(tmp_path, {"kind": "loops", "repeats": 3}), base_dir=tmp_path, source="space.yml")
    assert isinstance(space.genome, LoopSpec) and space.genome.repeats == 3
    genome = make_genome(space, models={})
    assert isinstance(genome, LoopGenome) and genome.space is space
    # the default kind still parses, and errors name the user's field, not pydantic's union tag
    assert parse_space(space_data(tmp_path), base_dir=tmp_path, source="space.yml").genome.kind == "parameters"
    with pytest.raises(ConfigError, match=r"genome\.repeats: "):
        parse_space(space_data(tmp_path, {"kind": "loops", "repeats": "many"}), base_dir=tmp_path, source="space.yml")
    with pytest.raises(ConfigError, match=r"genome\.weight: "):
        parse_space(space_data(tmp_path, {"weight": [1, 0]}), base_dir=tmp_path, source="space.yml")
    with pytest.raises(
        ConfigError, match=r"genome\.kind: unknown genome kind \(choose from: parameters, dataflow, moe, loops\)"
    ):
        parse_space(space_data(tmp_path, {"kind": "stacking"}), base_dir=tmp_path, source="space.yml")


def test_the_table_names_the_parameters_genome():
    assert kinds.GENOME_KINDS["parameters"].genome == f"{ParameterGenome.__module__}:{ParameterGenome.__name__}"
    assert kinds.GENOME_KINDS["parameters"].spec is GenomeSpec
