"""The pydantic base every config model derives from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo is reported, not silently defaulted); parsed configs are
    immutable, so one can be shared, hashed and compared safely."""

    model_config = ConfigDict(extra="forbid", frozen=True)
