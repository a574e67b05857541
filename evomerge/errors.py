"""User-facing errors.

Every mistake a user can make (a bad field, a missing model, incompatible shapes) raises
`EvomergeError` with one line that names the file, the field and what was expected. The CLI
prints that line and exits 2; only bugs produce tracebacks.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """A user mistake, reported as one line."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """A foreign library's error as the one line a message can quote: its first non-empty line
    (its type's name when it says nothing), at most `limit` characters."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]


class ConfigError(EvomergeError):
    """A config/space file is invalid: `file: field: what was expected`."""

    def __init__(self, message: str, *, file: object | None = None, field: str | None = None):
        parts = [str(p) for p in (file, field) if p]
        super().__init__(": ".join([*parts, message]))


class CompatibilityError(EvomergeError):
    """The input models cannot be merged together (architecture, tensor names, shapes)."""


class NonFiniteMergeError(EvomergeError, FloatingPointError):
    """A merge produced NaN or Inf (an overflowing weight, or NaN/Inf in a source tensor)."""


class InvalidPathError(EvomergeError):
    """A dataflow trial's genes decode to a layer path the space forbids (empty, too short, too
    deep): the trial fails with this one-line reason, the search goes on."""
