"""The sections about where and when tfpipe runs: the artifact root (`artifacts`), the schedule (`schedule`) and what
a caller of the served deployments may do (`serve`)."""

from __future__ import annotations

import os

from pydantic import Field, field_validator

from pipeline_config.base import Section


class ArtifactsConfig(Section):
    root: str = Field("./artifacts", validate_default=True)
    local_cache: str = Field("~/.cache/tfpipe", description="local copies of remote artifacts (staged shards, "
                             "models) and training work dirs when the root is a bucket; never the working directory")
    keep_last: int = Field(3, ge=1, description="tfpipe gc keeps the newest N published outputs of each stage")
    stale_work_hours: float = Field(24.0, gt=0, description="tfpipe gc removes training work dirs idle this long")

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """Local roots become absolute, so deployments and subprocesses agree on one place."""
        return _absolute_place(value)


class ScheduleConfig(Section):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"


def _absolute_place(place: str) -> str:
    """A local place as an absolute path (a `file://` URL as its path: one form for every branch that follows);
    a URL as it is."""
    from tasks.store.storage import is_local

    place = place.removeprefix("file://")
    return os.path.abspath(os.path.expanduser(place)) if is_local(place) else place


def _absolute_places(places: list[str]) -> list[str]:
    return [_absolute_place(p) for p in places]


class ServeConfig(Section):
    """What a caller of the served deployments (`tfpipe serve`) may do. The artifact root is always allowed for
    reading and writing; the artifact root, the config file and the `serve` section cannot be changed by a caller.
    Relative places are taken from the directory `tfpipe serve` starts in."""

    allowed_inputs: list[str] = Field(default_factory=lambda: ["data"], validate_default=True,
                                      description="directories or URL prefixes a served prediction may read")
    allowed_outputs: list[str] = Field(default_factory=lambda: ["data"], validate_default=True,
                                       description="directories or URL prefixes a served prediction may write")
    allowed_overrides: list[str] = Field(default_factory=lambda: ["train.epochs", "data.limit"],
                                         description="config keys a caller may set in `overrides`")

    _places = field_validator("allowed_inputs", "allowed_outputs")(_absolute_places)
