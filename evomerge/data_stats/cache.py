"""Statistics on disk: one safetensors file per (model, data, settings), computed once, then reused.

The key hashes everything the numbers depend on: the model's weights (io.hashing.checkpoint_hash,
not its path), the statistic's kind, the task names, the bytes of every file under the include
paths (task YAMLs and their data), the number of examples, the seed and this module's version.
Files are written to a temporary name and renamed, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from evomerge.io.hashing import checkpoint_hash

VERSION = 1  # bump when the computation changes what a file holds
KINDS = ("fisher", "gram")


@dataclass(frozen=True)
class StatisticsRequest:
    """What to compute: `kind` of `model_dir` on `examples` documents of `tasks`, drawn by `seed`."""

    kind: str
    model_dir: Path
    tasks: tuple[str, ...]
    include_paths: tuple[Path, ...] = ()
    examples: int = 256
    seed: int = 0


@dataclass(frozen=True)
class StatisticsResult:
    path: Path
    computed: bool  # False: a cache hit
    seconds: float  # spent computing (0 for a hit)
    peak_bytes: int  # peak resident memory of the process after computing (0 for a hit)


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def statistics_key(request: StatisticsRequest, weights: str | None = None) -> str:
    """The cache key of `request` (`weights`: the model's checkpoint_hash when already known)."""
    if request.kind not in KINDS:
        raise ValueError(f"unknown statistic '{request.kind}'; expected one of: {', '.join(KINDS)}")
    facts = {
        "version": VERSION,
        "kind": request.kind,
        "weights": weights or checkpoint_hash(request.model_dir),
        "tasks": list(request.tasks),
        "include": [_folder_digest(p) for p in request.include_paths],
        "examples": request.examples,
        "seed": request.seed,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compute_statistics(request: StatisticsRequest, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load the model, build its examples from its tasks and compute the statistic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from evomerge.data_stats.compute import fisher_diagonal, gram_matrices
    from evomerge.data_stats.examples import task_examples

    tokenizer = AutoTokenizer.from_pretrained(request.model_dir, trust_remote_code=False)
    bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per model says nothing here
    try:
        model = AutoModelForCausalLM.from_pretrained(
            request.model_dir, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        ).to(device)
    finally:
        if bar:
            transformers_logging.enable_progress_bar()
    examples = task_examples(
        request.tasks,
        include_paths=request.include_paths,
        model=model,
        tokenizer=tokenizer,
        count=request.examples,
        seed=request.seed,
    )
    compute = fisher_diagonal if request.kind == "fisher" else gram_matrices
    return {name: tensor.contiguous().cpu() for name, tensor in compute(model, examples).items()}


def ensure_statistics(
    request: StatisticsRequest,
    cache_dir: Path,
    *,
    device: str = "cpu",
    compute: Callable[[StatisticsRequest, str], dict[str, torch.Tensor]] = compute_statistics,
) -> StatisticsResult:
    """The cached file of `request` under `cache_dir`, computed and written first on a miss."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{request.kind}-{statistics_key(request)}.safetensors"
    if path.is_file():
        return StatisticsResult(path, computed=False, seconds=0.0, peak_bytes=0)
    started = time.perf_counter()
    tensors = compute(request, device)
    seconds = time.perf_counter() - started
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata={"kind": request.kind, "model": str(request.model_dir)})
    os.replace(partial, path)
    return StatisticsResult(path, computed=True, seconds=seconds, peak_bytes=_peak_rss_bytes())
