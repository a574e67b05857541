"""The worker's builder for genome kind `moe`: each trial's MoE checkpoint, written and loaded.

A MoE is another architecture than its sources, so a trial cannot overwrite one resident model
in place as a merge does: its checkpoint is written to a scratch folder exactly as `evomerge
export` writes it (`write_candidate`), hashed there, and loaded. That costs a write and a load
per trial, which is fine for the small families a routing search runs on.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.io.hashing import checkpoint_hash
from evomerge.moe.genome import MoEGenome, write_candidate
from evomerge.workers.builders import Candidate


class MoECandidates:
    def __init__(self, genome: MoEGenome, *, dtype: torch.dtype, device: str):
        self.genome = genome
        self.dtype = dtype
        self.device = device
        self._scratch = Path(tempfile.mkdtemp(prefix="evomerge-moe-"))
        self._references: dict[str, torch.nn.Module] = {}

    @property
    def sources_bytes(self) -> int:
        return 0  # nothing is held between trials: each candidate is read from its checkpoint

    def _load(self, folder: Path) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        return AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype).to(self.device).eval()

    def build(self, params: Mapping[str, Any]) -> Candidate:
        folder = self._scratch / "candidate"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        started = time.perf_counter()
        written = write_candidate(self.genome, params, folder)
        model = self._load(folder)
        built = time.perf_counter()
        digest = checkpoint_hash(folder, written.tensors)
        hashed = time.perf_counter()
        return Candidate(model, digest, self.genome.to_yaml(params), built - started, hashed - built)

    def reference(self, model: str) -> torch.nn.Module:
        if model not in self._references:
            self._references[model] = self._load(Path(self.genome.paths[model]))
        return self._references[model]

    def __del__(self) -> None:
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
