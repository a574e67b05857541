"""The fixed vocabularies of the trial store; each member equals the string the database holds."""

from __future__ import annotations

from enum import StrEnum


class TrialStatus(StrEnum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    PRUNED = "pruned"  # stopped at a low rung of successive halving: complete at that rung, never on the front


class Split(StrEnum):
    """Which tasks a score is on: the search tasks, or the held-out selection tasks of the finalists."""

    SEARCH = "search"
    SELECTION = "selection"
