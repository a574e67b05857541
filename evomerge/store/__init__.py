"""The trial store: evomerge's own tables beside the optuna study, in the same database."""

from evomerge.store.database import StorageError, check_storage
from evomerge.store.trial_store import (
    COMPLETE,
    FAILED,
    RUNNING,
    SPLITS,
    StudyInfo,
    TrialRecord,
    TrialStore,
    display_url,
)

__all__ = [
    "COMPLETE", "FAILED", "RUNNING", "SPLITS", "StorageError", "StudyInfo", "TrialRecord", "TrialStore",
    "check_storage", "display_url",
]

