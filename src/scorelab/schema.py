"""The base of every configuration model: unknown keys are errors, values are frozen after validation.

Kept apart from scorelab.config so that modules which define their own section (data, nets) can
import it without importing config, which imports them."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
