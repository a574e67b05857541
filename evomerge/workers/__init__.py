"""Worker pools: where candidates are merged and scored (in process, or Ray actors)."""

from evomerge.workers.pool import InProcessPool, RayPool, TrialOutcome, WorkerPool, make_pool

__all__ = ["InProcessPool", "RayPool", "TrialOutcome", "WorkerPool", "make_pool"]
