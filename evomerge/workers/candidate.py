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
from evomerge.evaluate.factory import make_evaluator
from evomerge.evaluate.protocol import Evaluator, Scores
from evomerge.genome.kinds import make_genome
from evomerge.genome.protocol import Genome
from evomerge.io.hashing import weights_hash
from evomerge.merge.resident import (
    ResidentSources,
    check_finite,
    check_target,
    load_into,
    materialize,
    target_parameters,
)
from evomerge.store.states import Split


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


def describe_device(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


class CandidateWorker:
    def __init__(
        self, space: SearchSpace, *, device: str | None = None, verbose: bool = False, genome: Genome | None = None
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        if not verbose:
            transformers_logging.disable_progress_bar()  # "Loading weights" bars; ours are enough
            transformers_logging.set_verbosity_error()
        self.space = space
        self.genome = genome or make_genome(space)
        self.device = resolve_device(device or space.device, option="device")
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        dtype = torch_dtype(space.dtype)
        donor = self.genome.paths[self.genome.base or self.genome.finetunes[0]]
        # Cheap checks first (tokenizer, task names), then the heavy loads.
        self.tokenizer = AutoTokenizer.from_pretrained(donor, trust_remote_code=space.trust_remote_code)
        self._make_evaluators(verbose)
        self.sources = ResidentSources(self.genome.models, dtype=dtype, device=self.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            # allow_pickle adds *.bin as a fallback; a safetensors donor is still read as safetensors
            donor,
            dtype=dtype,
            trust_remote_code=space.trust_remote_code,
            use_safetensors=None if space.allow_pickle else True,
        ).to(self.device)
        self.model.eval()
        self.target = target_parameters(self.model)
        check_target(self.genome.plan(self.genome.uniform_params() or self._any_params()), self.target)

    def _make_evaluators(self, verbose: bool) -> None:
        common = dict(tokenizer=self.tokenizer, device=self.device, verbose=verbose)
        self.search_evaluator = make_evaluator(self.space, Split.SEARCH, **common)
        self.selection_evaluator = make_evaluator(self.space, Split.SELECTION, **common)

    def _any_params(self) -> dict[str, Any]:
        return {
            name: (d.choices[0] if hasattr(d, "choices") else d.low) for name, d in self.genome.distributions().items()
        }

    def _evaluator(self, split: str) -> Evaluator:
        if split == Split.SEARCH:
            return self.search_evaluator
        if self.selection_evaluator is None:
            raise ValueError("no objective has a selection_task")
        return self.selection_evaluator

    def evaluate(self, params: Mapping[str, Any], split: str = "search") -> CandidateResult:
        """Merge the genome in place, hash it, score it. Raises on any failure (the caller fails the trial)."""
        plan = self.genome.plan(params)
        started = time.perf_counter()
        materialize(plan, self.sources, self.target)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        merged = time.perf_counter()
        check_finite(self.target, (r.name for r in plan.tensors))
        digest = weights_hash(self.target, (r.name for r in plan.tensors))
        hashed = time.perf_counter()
        scores = self._evaluator(split).evaluate(self.model)
        evaluated = time.perf_counter()
        return CandidateResult(
            scores=scores,
            merge_seconds=merged - started,
            eval_seconds=evaluated - hashed,
            weights_hash=digest,
            device=describe_device(self.device),
            plan_yaml=plan.recipe_yaml,
            worker=self.name,
            extra={"hash_seconds": hashed - merged},
        )

    def score_reference(self, model: str, split: str = "search") -> Scores:
        """Scores of one source model as it is (a parent or the base), via the resident copy."""
        load_into(self.target, self.sources, model)
        return self._evaluator(split).evaluate(self.model)
