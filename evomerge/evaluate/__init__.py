"""Scoring merged models: the Evaluator protocol, the evaluator table (`eval.kind`), and lm-eval (imported lazily: it is heavy)."""

from evomerge.evaluate.factory import EVALUATORS, make_evaluator
from evomerge.evaluate.harness import TaskEvaluator, evaluate_model_dir
from evomerge.evaluate.protocol import Evaluator, EvaluatorKind, Scores

__all__ = [
    "EVALUATORS",
    "Evaluator",
    "EvaluatorKind",
    "Scores",
    "TaskEvaluator",
    "evaluate_model_dir",
    "make_evaluator",
]
