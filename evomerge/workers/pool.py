"""The one place a worker pool is built: in process for one local worker, Ray actors otherwise."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from evomerge.config.space import SearchSpace
from evomerge.threads import WAIT_POLICY, torch_loaded_without_policy, worker_threads
from evomerge.workers.in_process import InProcessPool
from evomerge.workers.protocol import TrialOutcome, WorkerPool
from evomerge.workers.ray_pool import RayPool

if TYPE_CHECKING:
    from evomerge.genome.protocol import Genome

__all__ = ["InProcessPool", "RayPool", "TrialOutcome", "WorkerPool", "make_pool"]

log = logging.getLogger("evomerge.workers")


def make_pool(
    space: SearchSpace, *, workers: int | None = None, verbose: bool = False, genome: Genome | None = None
) -> WorkerPool:
    """In-process for one worker on a local machine; Ray actors otherwise.

    The in-process worker gets the thread settings of a Ray actor that has the machine to itself:
    passive OpenMP waiting (set when evomerge is imported) and one torch thread per idle core.
    """
    count = workers or space.search.workers
    if count <= 1 and not space.ray.address and not os.environ.get("RAY_ADDRESS"):
        import torch

        from evomerge.workers.candidate import CandidateWorker

        if torch_loaded_without_policy():
            log.warning(
                "torch was imported before evomerge, without OMP_WAIT_POLICY=%s: on a busy machine each trial "
                "can be several times slower; set it in the environment (or import evomerge first)",
                WAIT_POLICY,
            )
        previous = torch.get_num_threads()
        torch.set_num_threads(worker_threads())
        try:
            worker = CandidateWorker(space, verbose=verbose, genome=genome)
        except BaseException:
            torch.set_num_threads(previous)
            raise
        return InProcessPool(worker, restore_threads=previous)
    return RayPool(space, max(1, count), verbose=verbose, genome=genome)
