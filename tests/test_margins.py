"""Answer margins (evaluate/margins.py): how each multiple-choice item's responses are read (the
evaluators' margins against lm-eval's own accuracy: tests/test_request_cache.py)."""

from __future__ import annotations

import pytest

from evomerge.evaluate.margins import answer_margin


class ChoiceTask:
    """The parts of an lm-eval task answer_margin reads."""

    OUTPUT_TYPE = "multiple_choice"
    multiple_input = False

    def __init__(self, choices, gold, output_type="multiple_choice"):
        self.choices, self.gold, self.OUTPUT_TYPE = choices, gold, output_type

    def doc_to_choice(self, doc):
        return self.choices

    def doc_to_target(self, doc):
        return self.gold


def responses(*lls):
    return [(ll, False) for ll in lls]


@pytest.mark.parametrize(
    ("choices", "gold", "lls", "metric", "expected"),
    [
        (["a", "b", "c"], 1, (-3.0, -1.0, -2.0), "acc,none", 1.0),  # right by 1 nat over the best wrong one
        (["a", "b", "c"], 0, (-3.0, -1.0, -2.0), "acc,none", -2.0),  # wrong: negative
        (["a", "b", "c"], "c", (-3.0, -1.0, -2.0), "acc,none", -1.0),  # a gold given as the choice's text
        (["a", "b", "c"], [0, 2], (-3.0, -1.0, -2.0), "acc,none", -1.0),  # several golds: the best of them
        (["a", "bbbb"], 1, (-1.0, -2.0), "acc_norm,none", 0.5),  # per character: -2/4 against -1/1
        (["a", "b"], 0, (-1.0, -2.0, -5.0, -5.0), "acc,none", 1.0),  # mutual info's unconditional half is dropped
        (["a", "b"], 5, (-1.0, -2.0), "acc,none", None),  # a gold outside the choices
        (["a", "b"], [0, 1], (-1.0, -2.0), "acc,none", None),  # every choice right: nothing to separate
    ],
)
def test_a_margin_reads_the_responses_as_lm_eval_scores_them(choices, gold, lls, metric, expected):
    margin = answer_margin(ChoiceTask(choices, gold), {}, responses(*lls), metric)
    assert margin == (pytest.approx(expected) if expected is not None else None)


def test_other_output_types_have_no_margin():
    task = ChoiceTask(["a", "b"], 0, output_type="loglikelihood")
    assert answer_margin(task, {}, responses(-1.0, -2.0), "acc,none") is None
