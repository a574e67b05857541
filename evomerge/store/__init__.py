"""The trial store: evomerge's own tables beside the optuna study, in the same database."""

from evomerge.store.database import StorageError, check_storage
from evomerge.store.states import Split, TrialStatus
from evomerge.store.trial_store import (
    COMPLETE,
    FAILED,
    PRUNED,
    RUNNING,
    SPLITS,
    StudyInfo,
    TrialRecord,
    TrialStore,
    display_url,
)

__all__ = [
    "COMPLETE",
    "FAILED",
    "PRUNED",
    "RUNNING",
    "SPLITS",
    "Split",
    "StorageError",
    "StudyInfo",
    "TrialRecord",
    "TrialStatus",
    "TrialStore",
    "check_storage",
    "display_url",
]
