"""What every section of the config is made of: a pydantic model that rejects unknown keys and checks values on
assignment, and the one error a user fixes."""

from __future__ import annotations

import warnings

from pydantic import BaseModel, ConfigDict

# The validate section and its schema key shadow pydantic's deprecated v1 classmethods of those names (nothing here
# calls them): the names users read in the docs win over a warning at every start.
warnings.filterwarnings("ignore", message=r'Field name "(schema|validate)" in "(ValidateConfig|PipelineConfig)" shadows',
                        category=UserWarning)


class ConfigError(Exception):
    """A configuration the user must fix. Its message is one line that names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


VALIDATION_METRICS = ("val_loss", "val_accuracy", "val_precision", "val_recall")


def validation_metric(value: str) -> str:
    if value not in VALIDATION_METRICS:
        raise ValueError(f"monitor a validation metric: one of {', '.join(VALIDATION_METRICS)}")
    return value
