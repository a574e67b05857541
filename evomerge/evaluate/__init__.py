"""Scoring merged models with lm-evaluation-harness (imported lazily: lm-eval is heavy)."""

from evomerge.evaluate.harness import TaskEvaluator, evaluate_model_dir

__all__ = ["TaskEvaluator", "evaluate_model_dir"]
