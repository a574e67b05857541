"""A candidate worker: resident sources + one resident model + the evaluators.

Everything expensive happens once in `__init__` (read the sources, load the model object, load
the evaluators, e.g. lm-eval tasks); each candidate then costs an in-place merge and an evaluation. The search
loop only sees `evaluate(params)` and `score_reference(name)`, so a Ray actor can wrap the same
class (see evomerge.workers.ray_pool) without the loop knowing.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.config.space import SearchSpace
from evomerge.devices import resolve_device
from evomerge.dtypes import torch_dtype
from evomerge.errors import ConfigError
from evomerge.evaluate.estimator import IrtCalibration, IrtEstimator
from evomerge.evaluate.factory import make_evaluator
from evomerge.evaluate.protocol import Evaluator, ItemEvaluator, ItemIds, ItemScores, MarginEvaluator, Margins, Scores
from evomerge.genome.kinds import make_genome
from evomerge.genome.protocol import Genome
from evomerge.io.lora import model_folder
from evomerge.merge.vocab import load_output_tokenizer
from evomerge.store.states import Split
from evomerge.workers.builders import donor_name, make_builder


@dataclass
class CandidateResult:
    scores: Scores
    merge_seconds: float
    eval_seconds: float
    weights_hash: str
    device: str
    plan_yaml: str
    worker: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    item_scores: ItemScores | None = None  # per item values, when asked for (halving rungs, a calibration)


def describe_device(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


class CandidateWorker:
    def __init__(
        self, space: SearchSpace, *, device: str | None = None, verbose: bool = False, genome: Genome | None = None
    ):
        from transformers import AutoTokenizer
        from transformers.utils import logging as transformers_logging

        if not verbose:
            transformers_logging.disable_progress_bar()  # "Loading weights" bars; ours are enough
            transformers_logging.set_verbosity_error()
        self.space = space
        self.genome = genome or make_genome(space)
        self.device = resolve_device(device or space.device, option="device")
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        dtype = torch_dtype(space.dtype)
        donor = model_folder(self.genome.paths[donor_name(self.genome)])  # an adapter's: its base
        # Cheap checks first (tokenizer, task names), then the heavy loads.
        vocab = getattr(self.genome, "vocab", None)
        if vocab is not None:  # the output vocabulary's tokenizer (merge/vocab.py)
            self.tokenizer = load_output_tokenizer(vocab)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(donor, trust_remote_code=space.trust_remote_code)
        self._make_evaluators(verbose)
        self.builder = make_builder(self.genome, space, dtype=dtype, device=self.device)

    @property
    def model(self) -> torch.nn.Module | None:
        """The resident model a merge writes into (None for a dataflow genome: each trial builds its own)."""
        return getattr(self.builder, "model", None)

    def _make_evaluators(self, verbose: bool) -> None:
        common = dict(tokenizer=self.tokenizer, device=self.device, verbose=verbose)
        self.search_evaluator = make_evaluator(self.space, Split.SEARCH, **common)
        self.selection_evaluator = make_evaluator(self.space, Split.SELECTION, **common)

    def _evaluator(self, split: str) -> Evaluator:
        if split == Split.SEARCH:
            return self.search_evaluator
        if self.selection_evaluator is None:
            raise ValueError("no objective has a selection_task")
        return self.selection_evaluator

    def _item_evaluator(self, split: str, field: str) -> ItemEvaluator:
        return self._capable_evaluator(split, ItemEvaluator, field, "needs an evaluator that scores single items")

    def _capable_evaluator(self, split: str, protocol: type, field: str, needs: str, fix: str = "") -> Any:
        """The split's evaluator if it implements `protocol`, else a one-line ConfigError at `field`."""
        evaluator = self._evaluator(split)
        if not isinstance(evaluator, protocol):
            raise ConfigError(
                f"{needs}; eval.kind '{self.space.eval.kind}' does not{fix}",
                file=self.space.source_path,
                field=field,
            )
        return evaluator

    def item_ids(self, split: str = "search") -> ItemIds:
        """Every doc id of each leaf task at full budget: what successive halving draws its order from."""
        return self._item_evaluator(split, "eval.fidelity").item_ids()

    def evaluate(
        self,
        params: Mapping[str, Any],
        split: str = "search",
        *,
        items: ItemIds | None = None,
        per_item: bool = False,
        estimator: IrtCalibration | None = None,
    ) -> CandidateResult:
        """Build the genome's candidate, hash it, score it. Raises on any failure (the caller fails the trial).

        `items` (successive halving): score only these docs of each leaf task; `per_item`: score
        every item (an estimator's calibration). Both keep each scored item's values in the
        result's `item_scores`. `estimator`: score the calibration's anchor items only and report
        estimated full-set scores.
        """
        candidate = self.builder.build(params)
        started = time.perf_counter()
        item_scores = None
        if items is not None or per_item:
            field = "eval.fidelity" if items is not None else "eval.estimator"
            scores, item_scores = self._item_evaluator(split, field).evaluate_items(candidate.model, items)
        elif estimator is not None:
            scores = IrtEstimator(self._item_evaluator(split, "eval.estimator"), estimator).evaluate(candidate.model)
        else:
            scores = self._evaluator(split).evaluate(candidate.model)
        evaluated = time.perf_counter()
        return CandidateResult(
            scores=scores,
            merge_seconds=candidate.build_seconds,
            eval_seconds=evaluated - started,
            weights_hash=candidate.weights_hash,
            device=describe_device(self.device),
            plan_yaml=candidate.recipe_yaml,
            worker=self.name,
            extra={"hash_seconds": candidate.hash_seconds},
            item_scores=item_scores,
        )

    def score_reference(self, model: str, split: str = "search") -> Scores:
        """Scores of one source model as it is (a parent or the base), via the resident copy."""
        return self._evaluator(split).evaluate(self.builder.reference(model))

    def score_reference_items(self, model: str, split: str = "search") -> tuple[Scores, ItemScores]:
        """`score_reference` with each item's values (an estimator's calibration)."""
        return self._item_evaluator(split, "eval.estimator").evaluate_items(self.builder.reference(model))

    def score_reference_margins(self, model: str, split: str, metrics: dict[str, str]) -> tuple[Scores, Margins]:
        """`score_reference` with each item's answer margin on the tasks in `metrics` (successive
        halving's `order: margin`)."""
        evaluator = self._capable_evaluator(
            split,
            MarginEvaluator,
            "eval.fidelity.order",
            "order 'margin' needs an evaluator that reports answer margins",
            ": use order: random",
        )
        return evaluator.evaluate_margins(self.builder.reference(model), metrics)
