"""Data-flow-space candidates: a path through the decoder layers of several resident source models.

`path` describes a path (pure data), `path_model` runs it in memory on the sources' own layers
(no weight copies), `export` writes it as a standard checkpoint with the step scales folded in.
"""

from evomerge.dataflow.export import export_path, path_hash, path_recipe, path_state_dict
from evomerge.dataflow.path import LayerPath, PathStep
from evomerge.dataflow.path_model import build_path_model, check_chainable, load_sources

__all__ = [
    "LayerPath",
    "PathStep",
    "build_path_model",
    "check_chainable",
    "export_path",
    "load_sources",
    "path_hash",
    "path_recipe",
    "path_state_dict",
]
