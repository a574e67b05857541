"""Data-flow-space candidates: models that route the hidden state through a path of source layers."""
