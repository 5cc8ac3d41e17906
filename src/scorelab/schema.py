"""The base of every configuration model: unknown keys are errors, values are frozen after validation.

Kept apart from scorelab.config so that modules which define their own section (data, nets) can
import it without importing config, which imports them."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """Invalid configuration; `.problems` holds every problem found, each "dotted.location: message"."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(f"{head}{len(self.problems)} problem(s)\n" + "\n".join(f"  {p}" for p in self.problems))
