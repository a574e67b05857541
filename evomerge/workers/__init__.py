"""Worker pools: where candidates are merged and scored (in process, or Ray actors)."""

from evomerge.workers.in_process import InProcessPool
from evomerge.workers.pool import make_pool
from evomerge.workers.protocol import TrialOutcome, WorkerPool
from evomerge.workers.ray_pool import RayPool

__all__ = ["InProcessPool", "RayPool", "TrialOutcome", "WorkerPool", "make_pool"]
