"""What the dashboard is given: trial attributes, the study's attributes and notes (pure functions)."""

from __future__ import annotations

import pytest
import yaml
from families import random_family

from evomerge.config.space import parse_space
from evomerge.genome.parameters import ParameterGenome as Genome
from evomerge.search import annotate
from evomerge.search.front import FrontRow


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return random_family(tmp_path_factory.mktemp("annotate"), finetunes=2)


def make_genome(family, tmp_path, **genome):
    data = {
        "models": [f"a@{family['ft1']}", f"b@{family['ft2']}"],
        "base_model": f"base@{family['base']}",
        "dtype": "float32",
        "genome": {"methods": ["ties", "task_arithmetic"], **genome},
        "objectives": [{"task": "t1", "name": "close"}, {"task": "t2", "name": "sort"}],
        "search": {"n_trials": 5},
    }
    return Genome(parse_space(data, base_dir=tmp_path, source="space.yml", text=yaml.safe_dump(data)))


def test_methods_line_joins_equal_neighbouring_groups(family, tmp_path):
    genome = make_genome(family, tmp_path, layer_granularity=1)  # 4 layers, 4 groups, own emb/head genes
    params = {"g0.method": "ties", "g1.method": "ties", "g2.method": "task_arithmetic", "g3.method": "ties"}
    assert annotate.methods_line(genome, params) == (
        "layers 0-1 ties, layer 2 task_arithmetic, layer 3 ties, embeddings ties, head ties"
    )
    assert annotate.methods_line(genome, {}) == "layers 0-3 ?, embeddings ?, head ?"  # no genes: never raises
    fixed = make_genome(family, tmp_path, layer_granularity=2, methods=["ties"], embeddings=False, head=False)
    assert annotate.methods_line(fixed, {}) == "layers 0-3 ties"


def test_search_attrs_name_every_objective():
    attrs = annotate.search_attrs(
        ["close", "sort"],
        [0.96, 0.5],
        methods="layers 0-3 ties",
        weights_hash="ab" * 16,
        seconds={"merge": 0.125, "hash": 0.01, "eval": 1.5, "trial": 1.7},
        role_text="parent close alone",
    )
    assert attrs == {
        "score: close": 0.96,
        "score: sort": 0.5,
        "mean": 0.73,
        "methods": "layers 0-3 ties",
        "weights hash": "ab" * 16,
        "seconds": "merge 0.12 · hash 0.01 · eval 1.50 · trial 1.70",
        "role": "parent close alone",
    }
    assert annotate.search_attrs(["x"], [float("nan")], methods="m", weights_hash=None, seconds={})["score: x"] is None


def test_roles_of_enqueued_trials():
    assert annotate.role({"seed": "parent:close"}) == "parent close alone"
    assert annotate.role({"seed": "uniform"}) == "uniform mix of the parents"
    assert annotate.role({"seed": "parent:sort", "retry_of": 3}) == "parent sort alone, retry of trial 3"
    assert annotate.role({"retry_of": 7}) == "retry of trial 7"
    assert annotate.role({}) is None


def test_a_note_keeps_the_users_text_around_the_evomerge_section():
    first = annotate.finalist_note(["close"], [0.5], is_best=False)
    note = annotate.replace_section("my own remark\n", first)
    assert note.startswith("my own remark\n\n## evomerge") and "0.500" in note
    note += "\n\nanother remark"
    second = annotate.finalist_note(["close"], [0.75], is_best=True)
    updated = annotate.replace_section(note, second)
    assert updated.count("## evomerge") == 1 and "0.500" not in updated and "0.750" in updated
    assert updated.startswith("my own remark") and updated.endswith("another remark")
    assert "Best trial of the study" in updated
    assert annotate.replace_section("", first) == first


def test_study_note_and_attrs_mark_the_best_and_the_parents():
    class Objective:
        def __init__(self, label):
            self.label, self.task, self.metric, self.direction, self.weight = (
                label,
                f"demo_{label}",
                "acc,none",
                "maximize",
                1.0,
            )
            self.selection_task = f"demo_{label}_select"

    names = ["close", "sort"]
    best = FrontRow("trial 7", 7, [0.9, 1.0], [1.0, 0.8], "0123456789abcdef")
    other = FrontRow("trial 3", 3, [1.0, 0.2], None, "fedcba9876543210")
    parents = [FrontRow("base", None, [0.0, 0.0], [0.0, 0.0]), FrontRow("close", None, [1.0, 0.0], [1.0, 0.0])]
    note = annotate.study_note(
        "demo",
        [Objective(n) for n in names],
        [best, other],
        parents,
        best=best,
        seeds={0: "parent close alone"},
        n_complete=8,
        n_failed=1,
        finalists=2,
        finished=True,
    )
    assert "**Best: trial 7** (mean 0.950, held-out mean 0.900)" in note
    assert "| model | close | sort | mean | held-out mean | weights |" in note
    assert "| **trial 7 (best)** | **0.900** | **1.000** | **0.950** | **0.900** | **0123456789ab** |" in note
    assert "| close (as it is) | 1.000 | 0.000 | 0.500 | 0.500 |  |" in note
    assert "| trial 3 | 1.000 | 0.200 | 0.600 | - | fedcba987654 |" in note
    assert "trial 0: parent close alone" in note and "8 trials complete, 1 failed" in note
    assert note.splitlines()[-1].startswith(annotate.SECTION_END)

    attrs = annotate.study_attrs(
        names, parents, best, {0: "parent close alone"}, finished=True, methods="layers 0-3 ties"
    )
    assert list(attrs)[:3] == ["evomerge: best", "evomerge: objectives", "evomerge: enqueued trials"]
    assert attrs["evomerge: objectives"] == "values are, in order: close, sort"
    assert attrs["evomerge: reference close"] == "mean 0.500 · held-out mean 0.500 · close 1.000 · sort 0.000"
    assert attrs["evomerge: best"] == (
        "trial 7 · mean 0.950 · held-out mean 0.900 · close 0.900 · sort 1.000 · weights 0123456789ab · layers 0-3 ties"
    )
    assert attrs["evomerge: enqueued trials"] == "trial 0: parent close alone"
    running = annotate.study_attrs(names, parents, None, {}, finished=False)
    assert running["evomerge: best"] == "chosen when the search ends" and "evomerge: enqueued trials" not in running


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_trial_attrs_are_written_at_once_and_frozen_after_the_trial(tmp_path, backend):
    import os

    import optuna

    from evomerge.search.runner import _optuna_storage

    if backend == "postgresql":
        url = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
        if not url:
            pytest.skip("EVOMERGE_TEST_POSTGRES_URL is not set (scripts/with-postgres.sh sets it)")
    else:
        url = f"sqlite:///{tmp_path / 'attrs.db'}"
    study = optuna.create_study(storage=_optuna_storage(url), study_name=f"attrs-{tmp_path.name}")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr("seed", "parent:close")
    trial.set_user_attr("mean", "stale")
    attrs = {"score: close": 0.5, "mean": 0.5, "methods": "layers 0-3 ties", "role": "parent close alone"}
    annotate.set_trial_attrs(trial, attrs)
    study.tell(trial, 0.5)
    assert study.trials[-1].user_attrs == {"seed": "parent:close", **attrs}
    with pytest.raises(Exception, match="finished"):
        annotate.set_trial_attrs(trial, {"mean": 1.0})
