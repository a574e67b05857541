"""Data-flow-space candidates: a path through the decoder layers of several resident source models.

`path` describes a path (pure data), `path_model` runs it in memory on the sources' own layers
(no weight copies), `export` writes it as a standard checkpoint with the step scales folded in.
The package imports nothing itself, so reading a space file with a dataflow genome stays light.
"""
