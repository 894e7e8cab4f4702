"""Shared base for config models: unknown keys are errors, nothing is coerced silently."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Every config block: unknown keys rejected (so typos are caught), values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def explicitly_set_non_default(model: BaseModel, field: str) -> bool:
    """True when `field` was written by the user with a value other than its default.

    Truss's v2 check works this way: a v1 build field set to its default is accepted and ignored.
    """
    if field not in model.model_fields_set:
        return False
    info = type(model).model_fields[field]
    return getattr(model, field) != info.get_default(call_default_factory=True)
