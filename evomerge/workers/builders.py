"""Candidate builders: how a worker turns one trial's genes into a model object to score.

The worker (evomerge.workers.candidate) owns the tokenizer, the evaluators and the timing report;
a builder owns the resident sources and the model object. One builder per genome kind:

- `MergedCandidates` (parameters genome): one resident model whose weights are overwritten in
  place by each trial's merge plan.
- `MoECandidates` (moe genome, in evomerge.moe.candidates): each trial's MoE checkpoint, loaded.
- `PathCandidates` (dataflow genome): the sources loaded once as models; each trial's layer path
  becomes a path model whose layers are the sources' own modules (no weights copied). Its hash is
  `path_hash`, the hash of exactly the tensors `evomerge export` writes for that path.

`make_builder` is the one place a worker picks the builder, by the genome's capability
(`evomerge.genome.protocol.builds_paths`, `evomerge.moe.genome.builds_moe`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from evomerge.config.space import SearchSpace
from evomerge.genome.protocol import Genome, builds_paths
from evomerge.io.hashing import weights_hash
from evomerge.io.lora import model_folder
from evomerge.merge.resident import (
    ResidentSources,
    check_finite,
    check_target,
    load_into,
    materialize,
    target_parameters,
)


@dataclass
class Candidate:
    model: torch.nn.Module  # what the evaluator scores
    weights_hash: str  # the hash export checks its written weights against
    recipe_yaml: str
    build_seconds: float  # merge (or path build) time
    hash_seconds: float


class CandidateBuilder(Protocol):
    @property
    def sources_bytes(self) -> int:
        """Memory the resident sources take."""
        ...

    def build(self, params: Mapping[str, Any]) -> Candidate:
        """The candidate of one trial's genes; raises on any failure (the caller fails the trial)."""
        ...

    def reference(self, model: str) -> torch.nn.Module:
        """One source model as it is, ready to score."""
        ...


def donor_name(genome: Genome) -> str:
    """The model whose tokenizer (and, for a merge, config and class) the candidates share."""
    return getattr(genome, "anchor", None) or genome.base or genome.finetunes[0]


def make_builder(genome: Genome, space: SearchSpace, *, dtype: torch.dtype, device: str) -> CandidateBuilder:
    from evomerge.moe.genome import builds_moe

    if builds_paths(genome):
        return PathCandidates(genome, dtype=dtype, device=device)
    if builds_moe(genome):
        from evomerge.moe.candidates import MoECandidates

        return MoECandidates(genome, dtype=dtype, device=device)
    return MergedCandidates(genome, space, dtype=dtype, device=device)


def _any_params(genome: Genome) -> dict[str, Any]:
    return {name: (d.choices[0] if hasattr(d, "choices") else d.low) for name, d in genome.distributions().items()}


class MergedCandidates:
    """Parameters genome: every trial merges in place into one resident model."""

    def __init__(self, genome: Genome, space: SearchSpace, *, dtype: torch.dtype, device: str):
        from transformers import AutoModelForCausalLM

        self.genome = genome
        self.device = device
        # fisher/regmean: their statistics computed or read from the cache once, resident with the sources
        getattr(genome, "load_statistics", lambda device: None)(device)
        vocab = getattr(genome, "vocab", None)
        self.sources = ResidentSources(
            genome.models,
            dtype=dtype,
            device=device,
            vocab=vocab,
            vocab_base=genome.base,
            adapters=space.adapter_deltas,
        )
        self.model = AutoModelForCausalLM.from_pretrained(
            # allow_pickle adds *.bin as a fallback; a safetensors donor is still read as safetensors
            model_folder(genome.paths[donor_name(genome)]),  # an adapter's: its base (every tensor is overwritten)
            dtype=dtype,
            trust_remote_code=space.trust_remote_code,
            use_safetensors=None if space.allow_pickle else True,
        ).to(device)
        if vocab is not None:  # the candidates' rows: the output vocabulary's (values come per trial)
            self.model.resize_token_embeddings(vocab.size, mean_resizing=False)
        self.model.eval()
        self.target = target_parameters(self.model)
        check_target(genome.plan(genome.uniform_params() or _any_params(genome)), self.target)

    @property
    def sources_bytes(self) -> int:
        return self.sources.nbytes

    def build(self, params: Mapping[str, Any]) -> Candidate:
        plan = self.genome.plan(params)
        started = time.perf_counter()
        materialize(plan, self.sources, self.target)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        merged = time.perf_counter()
        check_finite(self.target, (r.name for r in plan.tensors))
        digest = weights_hash(self.target, (r.name for r in plan.tensors))
        hashed = time.perf_counter()
        return Candidate(self.model, digest, plan.recipe_yaml, merged - started, hashed - merged)

    def reference(self, model: str) -> torch.nn.Module:
        load_into(self.target, self.sources, model)
        return self.model


class PathCandidates:
    """Dataflow genome: every trial is a path model over the resident source models."""

    def __init__(self, genome: Any, *, dtype: torch.dtype, device: str):
        from evomerge.dataflow.path_model import check_chainable
        from evomerge.dataflow.sources import build_sources

        self.genome = genome
        names = [*genome.paths, *getattr(genome, "trials", {})]
        self.sources = build_sources(genome, names, dtype=dtype, device=device)
        pool = {name: self.sources[name] for name in genome.layer_counts}
        check_chainable(pool)
        if genome.spec.scale != "none":  # a scaled path must export: refuse before the first trial
            from evomerge.dataflow.export import check_foldable

            check_foldable(pool)

    @property
    def sources_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.sources.values() for t in m.state_dict().values())

    def build(self, params: Mapping[str, Any]) -> Candidate:
        from evomerge.dataflow.export import path_state_dict
        from evomerge.dataflow.path_model import build_path_model
        from evomerge.io.hashing import weights_hash

        path = self.genome.path(params)  # InvalidPathError: this trial fails with its reason
        started = time.perf_counter()
        model = build_path_model(path, self.sources)
        built = time.perf_counter()
        exported = path_state_dict(path, self.sources)  # what export writes: its hash is the candidate's
        digest = weights_hash(exported)
        hashed = time.perf_counter()
        recipe = self.genome.to_yaml(params, folds=exported.folds)
        return Candidate(model, digest, recipe, built - started, hashed - built)

    def reference(self, model: str) -> torch.nn.Module:
        return self.sources[model]
