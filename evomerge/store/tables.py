"""The evomerge tables, kept in the same database as the optuna study.

Every table name starts with `evomerge_`, so ours never collide with optuna's (`studies`,
`trials`, ...) and `metadata.create_all` never touches theirs. There are no foreign keys to
optuna's tables, or between ours: a trial row can be written before its study row, and a driver
that crashed half-way never leaves the store unwritable.

Objective values are kept as a JSON list in which NaN is written `null` (PostgreSQL's JSON does
not accept NaN); a single score is a nullable float, NULL meaning NaN.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

STUDY_UID_ATTR = "evomerge_study_uid"  # the optuna study system attr holding studies_table.study_uid

# A fixed naming convention makes constraint names identical on every database, so a later
# migration can name what it alters.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_json = JSON().with_variant(JSONB(), "postgresql")
_study_name = String(512)  # as long as optuna's study_name column
_short = String(255)

studies_table = Table(
    "evomerge_studies",
    metadata,
    Column("study", _study_name, primary_key=True),
    # The optuna study these rows belong to: a uuid kept in that study's system attrs too
    # (STUDY_UID_ATTR). A study deleted with optuna's tools and created again under the same name
    # gets a new one, so rows left by the old study are recognised. NULL in databases written
    # before the column existed (it is added on the first write).
    Column("study_uid", String(64), nullable=True),
    Column("space_yaml", Text, nullable=False),
    Column("space_path", Text, nullable=False),
    Column("directions", _json, nullable=False),  # ["maximize", "minimize", ...]
    Column("objective_names", _json, nullable=False),
    Column("objective_weights", _json, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

trials_table = Table(
    "evomerge_trials",
    metadata,
    Column("study", _study_name, primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),  # optuna trial number
    Column("status", String(16), nullable=False),  # running | complete | failed
    Column("genome", _json, nullable=False),
    Column("plan_yaml", Text, nullable=False, default=""),
    Column("objective_values", _json, nullable=True),  # list[float | None]; None is NaN
    Column("merge_seconds", Float, nullable=True),
    Column("eval_seconds", Float, nullable=True),
    Column("device", _short, nullable=True),
    Column("weights_hash", String(128), nullable=True),
    Column("failure", Text, nullable=True),
    Column("worker", _short, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index(None, "study", "status"),
)

scores_table = Table(
    "evomerge_scores",
    metadata,
    Column("study", _study_name, primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("split", String(32), primary_key=True),  # search | selection
    Column("task", _short, primary_key=True),
    Column("metric", _short, primary_key=True),
    Column("value", Float, nullable=True),  # NULL is NaN
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Index(None, "study", "split"),
)

references_table = Table(
    "evomerge_references",
    metadata,
    Column("study", _study_name, primary_key=True),
    Column("name", _short, primary_key=True),  # e.g. "base", "parent:math-7b"
    Column("path", Text, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

# One driver runs a study at a time: it holds the study's lease row, refreshed by a heartbeat.
leases_table = Table(
    "evomerge_leases",
    metadata,
    Column("study", _study_name, primary_key=True),
    Column("driver", String(64), nullable=False),  # a uuid per driver process
    Column("host", _short, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("acquired_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)

reference_scores_table = Table(
    "evomerge_reference_scores",
    metadata,
    Column("study", _study_name, primary_key=True),
    Column("name", _short, primary_key=True),
    Column("split", String(32), primary_key=True),
    Column("task", _short, primary_key=True),
    Column("metric", _short, primary_key=True),
    Column("value", Float, nullable=True),  # NULL is NaN
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

# Successive halving (eval.fidelity): each trial's objective values at each rung it finished.
# A trial's rung is the highest one here; a trial without rows ran at full fidelity.
rungs_table = Table(
    "evomerge_rungs",
    metadata,
    Column("study", _study_name, primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("rung", Integer, primary_key=True, autoincrement=False),  # 0 = the smallest budget
    Column("items_scored", Integer, nullable=False),  # items scored for this trial up to this rung, all tasks
    Column("objective_values", _json, nullable=False),  # list[float | None]; None is NaN
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

# Capping (eval.fidelity.cap): trials stopped because the best full-budget trials were out of their
# reach, and how far they had got. Such a trial's rung is still its highest row in rungs_table.
capped_table = Table(
    "evomerge_capped",
    metadata,
    Column("study", _study_name, primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("items_scored", Integer, nullable=False),  # items scored for the trial when it stopped, all tasks
    Column("items_full", Integer, nullable=False),  # the full budget's items, all tasks
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

# The study's fixed, nested item order per task: rung k scores the first n_k doc ids.
item_orders_table = Table(
    "evomerge_item_orders",
    metadata,
    Column("study", _study_name, primary_key=True),
    Column("task", _short, primary_key=True),
    Column("doc_ids", _json, nullable=False),  # list[int], the order drawn from the study seed
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)
