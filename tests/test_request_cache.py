"""The request cache scores exactly as lm-eval does: every task kind, full and item subsets, in-place weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.harness import TaskEvaluator
from evomerge.evaluate.protocol import ItemEvaluator, MarginEvaluator
from evomerge.evaluate.request_cache import RequestCacheEvaluator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tiny tasks of the kinds the demo does not use, on the demo's "sort" data.
_TASKS = {
    "tiny_loglikelihood": """
task: tiny_loglikelihood
dataset_path: json
dataset_kwargs: {data_files: {test: data.jsonl}}
test_split: test
output_type: loglikelihood
doc_to_text: "<s>{{question}} "
doc_to_target: "{{answer}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "tiny_generate": """
task: tiny_generate
dataset_path: json
dataset_kwargs: {data_files: {test: data.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: " {{answer}}"
generation_kwargs: {until: ["\\n", "</s>"], max_gen_toks: 10, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
    "tiny_rolling": """
task: tiny_rolling
dataset_path: json
dataset_kwargs: {data_files: {test: data.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}} {{answer}}"
metric_list:
  - {metric: word_perplexity}
  - {metric: byte_perplexity}
""",
}


@pytest.fixture(scope="module")
def tokenizer(demo_family):
    return AutoTokenizer.from_pretrained(demo_family.base)


@pytest.fixture(scope="module")
def tiny_tasks(tasks_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tasks")
    docs = [json.loads(line) for line in (tasks_dir / "data" / "sort_search.jsonl").read_text().splitlines()[:12]]
    (folder / "data.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    for name, text in _TASKS.items():
        (folder / f"{name}.yaml").write_text(text.lstrip())
    return folder


def _same(expected: dict, got: dict) -> None:
    """Equal keys; equal values, exactly for accuracies, to 1e-6 (relative) where logprobs add up.

    Scores: task -> metric -> value; per-item values: task -> metric -> doc id -> value.
    """
    assert set(expected) == set(got)
    for name, metrics in expected.items():
        assert set(metrics) == set(got[name]), name
        for metric, value in metrics.items():
            if isinstance(value, dict):
                assert set(value) == set(got[name][metric]), (name, metric)
                for doc_id, item_value in value.items():
                    _same_value(item_value, got[name][metric][doc_id], (name, metric, doc_id))
            else:
                _same_value(value, got[name][metric], (name, metric))


def _same_value(expected: float, got: float, where: tuple) -> None:
    if math.isnan(expected):
        assert math.isnan(got), where
    elif where[1].startswith(("acc", "exact_match")):
        assert got == expected, where
    else:
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-6), where


def _both(tasks, include_paths, tokenizer, **kwargs) -> tuple[TaskEvaluator, RequestCacheEvaluator]:
    plain = TaskEvaluator(tasks, include_paths=include_paths, tokenizer=tokenizer, **kwargs)
    cached = RequestCacheEvaluator(tasks, include_paths=include_paths, tokenizer=tokenizer, **kwargs)
    return plain, cached


def _mixed_model(demo_family):
    """A half-way merge of two skills: varied per-item values, not all 0 or 1."""
    model = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["sort"])
    other = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["reverse"]).state_dict()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(0.5 * param + 0.5 * other[name])
    return model


def test_multiple_choice_matches_lm_eval_full_and_on_items(demo_family, tasks_dir, tokenizer):
    plain, cached = _both(["demo"], [tasks_dir], tokenizer, limit=30, batch_size=16)
    assert isinstance(cached, ItemEvaluator) and cached.item_ids() == plain.item_ids()
    model = _mixed_model(demo_family)

    expected, expected_items = plain.evaluate_items(model)
    got, got_items = cached.evaluate_items(model)
    _same(expected, got)  # the leaf tasks and the group's aggregate
    _same(expected_items, got_items)
    assert 0 < got["demo"]["acc,none"] < 1

    # A subset, unsorted, with docs beyond the prepared `limit` (built on demand).
    items = {"demo_sort": [29, 3, 45, 11, 70], "demo_close": [0, 99]}
    expected, expected_items = plain.evaluate_items(model, items)
    got, got_items = cached.evaluate_items(model, items)
    _same(expected, got)
    _same(expected_items, got_items)
    assert sorted(got_items["demo_sort"]["acc,none"]) == sorted(items["demo_sort"])
    assert len(got_items["demo_shift"]["acc,none"]) == 30  # a task not named keeps its full budget
    assert cached.evaluate(model, items) == got
    _same(plain.evaluate(model), cached.evaluate(model))  # the full budget again after a subset
    with pytest.raises(ValueError, match="demo_nope"):
        cached.evaluate(model, {"demo_nope": [0]})


def test_loglikelihood_generation_and_fallback_match_lm_eval(demo_family, tiny_tasks, tokenizer, caplog):
    plain, cached = _both(list(_TASKS), [tiny_tasks], tokenizer, batch_size=5)
    model = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["sort"])

    expected, expected_items = plain.evaluate_items(model)
    with caplog.at_level("WARNING", logger="evomerge.evaluate"):
        got, got_items = cached.evaluate_items(model)
    _same(expected, got)
    _same(expected_items, got_items)
    assert expected["tiny_loglikelihood"]["acc,none"] > 0.5  # with its BOS, the sort model's greedy answer
    assert 1 < expected["tiny_loglikelihood"]["perplexity,none"] < math.inf
    assert expected["tiny_generate"]["exact_match,none"] == 1.0  # stopped at "\n"
    assert "scoring tiny_rolling the plain lm-eval way" in caplog.text  # said once, for the rolling task
    assert "tiny_loglikelihood" not in caplog.text

    items = {"tiny_loglikelihood": [5, 1], "tiny_generate": [2, 9, 4], "tiny_rolling": [3, 0]}
    expected, expected_items = plain.evaluate_items(model, items)
    got, got_items = cached.evaluate_items(model, items)
    _same(expected, got)
    _same(expected_items, got_items)
    assert caplog.text.count("plain lm-eval way") == 1


def test_both_evaluators_report_the_same_margins_and_their_sign_is_lm_evals_accuracy(
    demo_family, tasks_dir, tiny_tasks, tokenizer
):
    plain, cached = _both(["demo_sort", "demo_close", *_TASKS], [tasks_dir, tiny_tasks], tokenizer, limit=25)
    assert isinstance(plain, MarginEvaluator) and isinstance(cached, MarginEvaluator)
    model = _mixed_model(demo_family)
    metrics = {"demo_sort": "acc,none", "demo_close": "acc,none", "tiny_generate": "exact_match,none"}

    scores, margins = cached.evaluate_margins(model, metrics)
    plain_scores, plain_margins = plain.evaluate_margins(model, metrics)
    assert set(margins) == set(plain_margins) == {"demo_sort", "demo_close"}  # the generation task has none
    _, items = cached.evaluate_items(model)
    for task in margins:
        assert sorted(margins[task]) == list(range(25))
        for doc, margin in margins[task].items():
            assert margin == pytest.approx(plain_margins[task][doc], abs=1e-4)  # packed rows vs lm-eval's own
            if abs(margin) > 1e-4:
                assert (margin > 0) == (items[task]["acc,none"][doc] == 1.0), (task, doc, margin)
        assert scores[task]["acc,none"] == plain_scores[task]["acc,none"]
    assert 0 < scores["demo_sort"]["acc,none"] < 1  # the mixed model gets some right and some wrong


def test_in_place_weight_changes_are_picked_up(demo_family, tasks_dir, tokenizer):
    plain, cached = _both(["demo_reverse"], [tasks_dir], tokenizer, limit=20)
    model = AutoModelForCausalLM.from_pretrained(demo_family.base)
    base_state = {name: value.clone() for name, value in model.state_dict().items()}
    reverse_state = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["reverse"]).state_dict()

    def acc() -> float:
        score = cached.evaluate(model)["demo_reverse"]["acc,none"]
        assert score == plain.evaluate(model)["demo_reverse"]["acc,none"]
        return score

    assert acc() == 0.0
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(reverse_state[name])
    assert acc() >= 0.9
    model.load_state_dict(base_state)
    assert acc() == 0.0
    model.train()
    cached.evaluate(model)
    assert model.training, "the caller's train/eval mode is restored"


def test_eval_request_cache_picks_the_evaluator(demo_family, tasks_dir, tmp_path):
    from evomerge.config.space import parse_space
    from evomerge.evaluate.factory import make_evaluator

    def space(**evaluation):
        data = {
            "models": [f"{skill}@{path}" for skill, path in demo_family.finetunes.items()],
            "base_model": f"base@{demo_family.base}",
            "genome": {"layer_granularity": 2, "methods": ["task_arithmetic"], "lambda": [0.5, 1.5]},
            "objectives": [{"task": "demo_sort", "metric": "acc,none"}],
            "eval": {"include_paths": [str(tasks_dir)], "limit": 2, **evaluation},
            "search": {"n_trials": 2, "storage": f"sqlite:///{tmp_path}/study.db"},
        }
        return parse_space(data, base_dir=tmp_path)

    assert type(make_evaluator(space(), "search", tokenizer=None, device="cpu")) is RequestCacheEvaluator
    off = make_evaluator(space(request_cache=False), "search", tokenizer=None, device="cpu")
    assert type(off) is TaskEvaluator


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_choices_score_as_lm_eval(demo_family, tasks_dir, tokenizer, attention):
    """Choices sharing a context run as one row; left-truncated ones (max_length 18) one row each."""
    model = _mixed_model(demo_family)
    model.set_attn_implementation(attention)
    for max_length in (None, 18):
        plain, cached = _both(["demo"], [tasks_dir], tokenizer, limit=12, batch_size=8, max_length=max_length)
        expected, expected_items = plain.evaluate_items(model)
        got, got_items = cached.evaluate_items(model)
        _same(expected, got)
        _same(expected_items, got_items)
        rows = cached._table.rows
        assert any(row.packed for row in rows)
        assert any(not row.packed for row in rows) == (max_length == 18)


def test_a_model_that_ignores_the_mask_is_not_packed(demo_family, tasks_dir, tokenizer, caplog):
    """Checked on each new model object: one that ignores the block mask gets one row per choice."""
    plain, cached = _both(["demo_sort", "demo_close"], [tasks_dir], tokenizer, limit=12)
    first = _mixed_model(demo_family)
    _same(plain.evaluate(first), cached.evaluate(first))
    assert any(row.packed for row in cached._table.rows)

    model = _mixed_model(demo_family)
    forward = model.forward

    def mask_blind(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return forward(input_ids, **kwargs)

    model.forward = mask_blind
    with caplog.at_level("WARNING", logger="evomerge.evaluate"):
        got = cached.evaluate(model)
    assert "not packing" in caplog.text
    assert not any(row.packed for row in cached._table.rows)
    _same(plain.evaluate(model), got)


def test_few_shot_prompts_are_lm_evals_first_draw_for_every_candidate(demo_family, tasks_dir, tokenizer):
    """lm-eval draws new shots on every evaluate (its sampler is never reseeded); the cache keeps its first draw."""
    plain, cached = _both(["demo_sort"], [tasks_dir], tokenizer, limit=10, num_fewshot=1)
    model = _mixed_model(demo_family)
    first = cached.evaluate_items(model)
    expected = plain.evaluate_items(model)
    _same(expected[0], first[0])
    _same(expected[1], first[1])
    prompts = [instance.args[0] for instance in cached._task_dict["tasks"]["demo_sort"].instances]
    assert cached.evaluate_items(model) == first
    assert [instance.args[0] for instance in cached._task_dict["tasks"]["demo_sort"].instances] == prompts
