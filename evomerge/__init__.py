"""evomerge: evolutionary search over model-merge recipes.

The public, importable API lives here; everything else is an implementation detail.
"""

__version__ = "0.1.0"
