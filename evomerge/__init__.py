"""evomerge: evolutionary search over model-merge recipes.

The importable API (loaded lazily, so `import evomerge` stays cheap):

    from evomerge import load_space, run_search, export_trial      # the search service
    from evomerge import load_merge_config, plan_merge, run_merge   # one-shot mergekit-style merges
    from evomerge import build_demo_family                          # the offline demo family
"""

from __future__ import annotations

import importlib

from evomerge.threads import prefer_passive_openmp

# Before anything imports torch: candidate workers wait passively (evomerge/threads.py says why).
prefer_passive_openmp()

__version__ = "0.1.0"

_EXPORTS = {
    "load_space": "evomerge.config.space",
    "SearchSpace": "evomerge.config.space",
    "run_search": "evomerge.search.runner",
    "SearchSummary": "evomerge.search.front",
    "export_trial": "evomerge.export",
    "load_merge_config": "evomerge.config.mergekit_yaml",
    "plan_merge": "evomerge.merge.planner",
    "run_merge": "evomerge.merge.engine",
    "MergePlan": "evomerge.merge.plan",
    "TrialStore": "evomerge.store.trial_store",
    "build_demo_family": "evomerge.demo",
    "EvomergeError": "evomerge.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
