"""TaskEvaluator: lm-eval on an in-memory model, re-scored after in-place weight changes."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate import TaskEvaluator, evaluate_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(demo_family):
    return AutoTokenizer.from_pretrained(demo_family.base)


@pytest.fixture(scope="module")
def reverse_evaluator(tasks_dir, tokenizer):
    return TaskEvaluator(["demo_reverse", "demo_sort"], include_paths=[tasks_dir], tokenizer=tokenizer, limit=40)


def test_scores_every_metric_as_plain_floats(demo_family, reverse_evaluator, capfd):
    model = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["reverse"])
    scores = reverse_evaluator.evaluate(model)

    assert set(scores) == {"demo_reverse", "demo_sort"}
    for metrics in scores.values():
        assert {"acc,none", "acc_stderr,none"} <= set(metrics)
        assert all(type(value) is float for value in metrics.values())
        assert math.isnan(metrics["acc_stderr,none"])  # lm-eval's 'N/A' (no bootstrap)
    assert scores["demo_reverse"]["acc,none"] >= 0.9
    assert scores["demo_sort"]["acc,none"] <= 0.1
    # Quiet by default: no per-request progress bars, no expected-warning noise.
    err = capfd.readouterr().err
    assert "Running loglikelihood requests" not in err
    assert "is not of type `str`" not in err


def test_in_place_weight_changes_are_picked_up(demo_family, reverse_evaluator):
    model = AutoModelForCausalLM.from_pretrained(demo_family.base)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    reverse_state = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["reverse"]).state_dict()

    def acc() -> float:
        return reverse_evaluator.evaluate(model)["demo_reverse"]["acc,none"]

    assert acc() == 0.0
    wrapper = reverse_evaluator._lm
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(reverse_state[name])
    assert acc() >= 0.9
    model.load_state_dict(base_state)
    assert acc() == 0.0
    assert reverse_evaluator._lm is wrapper, "same model object: the HFLM wrapper is reused"

    model.train()
    reverse_evaluator.evaluate(model)
    assert model.training, "the caller's train/eval mode is restored"


def test_a_new_model_object_is_wrapped_afresh(demo_family, reverse_evaluator):
    first = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["sort"])
    second = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["reverse"])
    assert reverse_evaluator.evaluate(first)["demo_sort"]["acc,none"] >= 0.9
    assert reverse_evaluator.evaluate(second)["demo_reverse"]["acc,none"] >= 0.9


def test_relative_data_files_resolve_against_the_yaml_from_any_cwd(
    demo_family, tasks_dir, tokenizer, tmp_path, monkeypatch
):
    custom = tmp_path / "my_tasks"
    (custom / "templates").mkdir(parents=True)
    (custom / "data").mkdir()
    shutil.copy(tasks_dir / "data" / "close_select.jsonl", custom / "data" / "brackets.jsonl")
    shutil.copy(tasks_dir / "_demo_template_yaml", custom / "templates" / "_template_yaml")
    (custom / "brackets.yaml").write_text(
        "include: templates/_template_yaml\ntask: my_brackets\n"
        "dataset_kwargs:\n  data_files:\n    test: data/brackets.jsonl\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    evaluator = TaskEvaluator(
        ["my_brackets", "demo_close_select"], include_paths=[custom, tasks_dir], tokenizer=tokenizer, limit=30
    )
    scores = evaluator.evaluate(AutoModelForCausalLM.from_pretrained(demo_family.finetunes["close"]))
    assert scores["my_brackets"]["acc,none"] >= 0.9
    assert scores["my_brackets"]["acc,none"] == scores["demo_close_select"]["acc,none"]  # same items


def test_groups_expand_and_aggregate(demo_family, tasks_dir, tokenizer):
    evaluator = TaskEvaluator(["demo"], include_paths=[tasks_dir], tokenizer=tokenizer, limit=20)
    assert evaluator.task_names == demo_family.tasks("search")
    scores = evaluator.evaluate(AutoModelForCausalLM.from_pretrained(demo_family.finetunes["shift"]))
    per_task = [scores[t]["acc,none"] for t in demo_family.tasks("search")]
    assert scores["demo"]["acc,none"] == pytest.approx(sum(per_task) / len(per_task))
    assert scores["demo_shift"]["acc,none"] >= 0.9


def test_evaluate_model_dir(demo_family, tasks_dir):
    scores = evaluate_model_dir(
        demo_family.finetunes["sort"], ["demo_sort_select"], include_paths=[tasks_dir], limit=20
    )
    assert scores["demo_sort_select"]["acc,none"] >= 0.9


def test_unknown_task_names_the_places_searched(tasks_dir, tokenizer):
    message = r"unknown lm-eval task 'no_such_task' \(searched: .*tasks and lm-eval's built-in tasks\)"
    with pytest.raises(ValueError, match=message):
        TaskEvaluator(["demo_sort", "no_such_task"], include_paths=[tasks_dir], tokenizer=tokenizer)


def test_bad_arguments_fail_early(tasks_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no tasks"):
        TaskEvaluator([], include_paths=[tasks_dir], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="not a directory"):
        TaskEvaluator(["demo_sort"], include_paths=[tmp_path / "missing"], tokenizer=tokenizer)


def test_a_missing_data_file_is_reported_where_the_yaml_meant_it(tasks_dir, tokenizer, tmp_path):
    custom = tmp_path / "broken"
    custom.mkdir()
    shutil.copy(tasks_dir / "_demo_template_yaml", custom)
    (custom / "broken.yaml").write_text(
        "include: _demo_template_yaml\ntask: broken\ndataset_kwargs:\n  data_files:\n    test: data/missing.jsonl\n"
    )
    with pytest.raises(Exception, match=str(custom / "data" / "missing.jsonl")):
        TaskEvaluator(["broken"], include_paths=[custom], tokenizer=tokenizer)


def test_hub_dataset_file_names_are_left_alone(tmp_path):
    from evomerge.evaluate.harness import _absolutise

    yaml_path = tmp_path / "hub.yaml"
    yaml_path.write_text("task: hub\n")
    cfg = {"dataset_path": "org/dataset", "dataset_kwargs": {"data_files": {"test": "sub/test.json"}}}
    assert _absolutise(dict(cfg), yaml_path) == cfg
    local = {"dataset_path": "json", "dataset_kwargs": {"data_files": ["a.jsonl", "/abs/b.jsonl"]}}
    resolved = _absolutise(dict(local), yaml_path)["dataset_kwargs"]["data_files"]
    assert resolved == [str(tmp_path / "a.jsonl"), "/abs/b.jsonl"]


def test_item_ids_and_per_item_scores(demo_family, reverse_evaluator):
    """Per-item values average to lm-eval's task score; a subset scores exactly those items."""
    from evomerge.evaluate.protocol import ItemEvaluator

    assert isinstance(reverse_evaluator, ItemEvaluator)
    model = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["reverse"])
    ids = reverse_evaluator.item_ids()
    assert ids == {"demo_reverse": list(range(40)), "demo_sort": list(range(40))}  # the first `limit` docs
    scores, per_item = reverse_evaluator.evaluate_items(model)
    values = per_item["demo_reverse"]["acc,none"]
    assert sorted(values) == ids["demo_reverse"]
    assert scores["demo_reverse"]["acc,none"] == pytest.approx(sum(values.values()) / len(values))

    chosen = [7, 2, 11]
    sub_scores, sub_items = reverse_evaluator.evaluate_items(model, {"demo_reverse": chosen})
    assert sorted(sub_items["demo_reverse"]["acc,none"]) == sorted(chosen)
    assert all(sub_items["demo_reverse"]["acc,none"][i] == values[i] for i in chosen)
    expected = sum(values[i] for i in chosen) / len(chosen)
    assert sub_scores["demo_reverse"]["acc,none"] == pytest.approx(expected)
    assert reverse_evaluator.evaluate(model, {"demo_reverse": chosen}) == sub_scores
    assert len(sub_items["demo_sort"]["acc,none"]) == 40  # a task not named keeps its full budget
    with pytest.raises(ValueError, match="demo_shift"):
        reverse_evaluator.evaluate(model, {"demo_shift": [0]})
