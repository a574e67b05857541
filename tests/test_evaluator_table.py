"""A second evaluator is one entry in the evaluator table: the factory builds it, and its metric is an objective."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.config.space import parse_space
from evomerge.errors import ConfigError
from evomerge.evaluate.factory import EVALUATORS, make_evaluator
from evomerge.evaluate.harness import TaskEvaluator
from evomerge.evaluate.protocol import EvaluatorKind

REPO = Path(__file__).resolve().parents[1]


class WeightMean:
    """Scores a model by the mean of its weights: a fixed function of the merged weights, no tasks."""

    def evaluate(self, model) -> dict[str, dict[str, float]]:
        import torch

        with torch.no_grad():
            total = sum(float(p.double().sum()) for p in model.parameters())
            count = sum(p.numel() for p in model.parameters())
        return {"weights": {"mean": total / count}}


def build_weight_mean(space, tasks, *, limit, tokenizer, device, verbose) -> WeightMean:
    if tasks != ["weights"]:
        raise ValueError(f"the weight_mean evaluator scores only the task 'weights', not {tasks}")
    return WeightMean()


def check_weight_mean(space, tokenizer_dir) -> str:
    for index, objective in enumerate(space.objectives):
        if objective.metric != "mean":
            raise ConfigError(
                f"weight_mean reports no metric '{objective.metric}'",
                file=space.source_path,
                field=f"objectives.{index}.metric",
            )
    return "weights: every objective's metric is reported"


@pytest.fixture
def weight_mean_kind(monkeypatch):
    monkeypatch.setitem(EVALUATORS, "weight_mean", EvaluatorKind(build=build_weight_mean, check=check_weight_mean))


def space_data(family, tmp_path: Path, **evaluation) -> dict:
    return {
        "models": [f"{skill}@{path}" for skill, path in family.finetunes.items()],
        "base_model": f"base@{family.base}",
        "dtype": "float32",
        "device": "cpu",
        "genome": {"layer_granularity": 2, "methods": ["task_arithmetic"], "lambda": [0.5, 1.5]},
        "objectives": [{"task": "weights", "metric": "mean"}],
        "eval": evaluation,
        "search": {"seed": 0, "n_trials": 4, "study_name": "weights", "storage": f"sqlite:///{tmp_path}/study.db"},
    }


def test_the_factory_builds_the_evaluator_eval_kind_names(demo_family, tmp_path, weight_mean_kind):
    space = parse_space(space_data(demo_family, tmp_path, kind="weight_mean"), base_dir=tmp_path)
    assert isinstance(make_evaluator(space, "search", tokenizer=None, device="cpu"), WeightMean)
    assert make_evaluator(space, "selection", tokenizer=None, device="cpu") is None  # no selection_task

    data = space_data(demo_family, tmp_path, include_paths=[str(REPO / "tasks")], limit=2)
    data["objectives"] = [{"task": "demo_sort", "metric": "acc,none"}]
    lm_eval = make_evaluator(parse_space(data, base_dir=tmp_path), "search", tokenizer=None, device="cpu")
    assert isinstance(lm_eval, TaskEvaluator) and lm_eval.tasks == ["demo_sort"]  # the default kind

    misspelt = parse_space(space_data(demo_family, tmp_path, kind="weight_means"), base_dir=tmp_path)
    with pytest.raises(ConfigError) as refused:
        make_evaluator(misspelt, "search", tokenizer=None, device="cpu")
    assert "eval.kind: unknown evaluator 'weight_means'" in str(refused.value) and "did you mean 'weight_mean'?" in str(
        refused.value
    )


def test_an_objective_on_the_second_evaluators_metric_drives_the_search(demo_family, tmp_path, weight_mean_kind):
    from evomerge.search.runner import run_search
    from evomerge.store.trial_store import TrialStore

    space = parse_space(space_data(demo_family, tmp_path, kind="weight_mean"), base_dir=tmp_path)
    summary = run_search(space, progress=False)
    assert summary.n_complete == 4 and summary.n_failed == 0
    with TrialStore(space.storage_url) as store:
        scores = store.scores("weights", "search")
        references = store.references("weights", "search")
        trials = store.trials("weights")
    assert set(references) == {"base", *demo_family.skills}
    for trial in trials:  # what optuna was told is the evaluator's metric
        assert trial.values == [pytest.approx(scores[trial.number]["weights"]["mean"])]
    assert summary.best is not None
    assert summary.best.search[0] == pytest.approx(max(t.values[0] for t in trials))
