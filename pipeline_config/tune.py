"""The tuning sections: the Optuna study (`tune`: search space, sampler, pruner, storage, Dask) and MLflow
tracking (`tracking`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline_config.base import Section


class SearchDimension(Section):
    """One key of tune.search_space: a range (float, or int when low and high are whole numbers) or choices."""
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="sample the range on a log scale")
    step: float | None = Field(None, gt=0, description="a range in steps of this (grid: the grid's spacing)")
    choices: list[Any] | None = Field(None, min_length=1, description="categorical: one of these values")

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SearchDimension":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low and high, not both")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError("give choices, or low < high")
        elif self.log and self.low <= 0:
            raise ValueError("log: low must be > 0")
        elif self.log and self.step:
            raise ValueError("log and step exclude each other")
        if self.choices is not None and not all(isinstance(c, (str, int, float, bool)) for c in self.choices):
            raise ValueError("choices are numbers, strings or booleans")
        return self

    @property
    def integer(self) -> bool:
        return self.choices is None and all(float(v).is_integer() for v in (self.low, self.high, self.step or 1))


# keys a trial may not change: where results go, what the study is, and the stages after training
_NOT_TUNABLE = ("tune.", "tracking.", "artifacts.", "rerun", "validate.", "evaluate.", "predict.", "schedule.", "serve.",
                "train.strategy", "train.local_workers")
_METRICS = ("loss", "accuracy", "precision", "recall")


class TuneConfig(Section):
    """tfpipe tune: Optuna trials, each the ordinary train stage with the trial's config (tasks/tune/)."""
    search_space: dict[str, SearchDimension] = Field(default_factory=dict, description="dotted config key -> "
                                                     "{low, high, log, step} or {choices}")
    objective: str = Field("val_accuracy", description="the epoch metric a trial is judged by")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="default: minimize for losses, "
                                                              "else maximize")
    trials: int = Field(8, ge=1, description="trials in the study, all runs of it together")
    parallel: int = Field(2, ge=1, description="trials at once, one per Dask worker")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruning_startup_trials: int = Field(2, ge=0, description="median: finished trials before any is pruned")
    warmup_epochs: int = Field(0, ge=0, description="median: epochs of a trial never pruned")
    seed: int = Field(0, description="the sampler's seed")
    timeout: float | None = Field(None, gt=0, description="seconds after which no new trial starts")
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="trials run first, as {key: value} "
                                          "(a known good config, say)")
    storage: str | None = Field(None, description="an Optuna database URL (postgresql://user@host/db, sqlite:///f); "
                                "null: a journal file under the artifact root (one machine)")
    dask_address: str | None = Field(None, description="an existing scheduler (tcp://host:8786); null: a "
                                     "LocalCluster of `parallel` workers")

    @field_validator("objective")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        known = [f"{prefix}{m}" for prefix in ("val_", "") for m in _METRICS]
        if value not in known:
            raise ValueError(f"one of {', '.join(known)}")
        return value

    @field_validator("search_space")
    @classmethod
    def _tunable(cls, space: dict) -> dict:
        for key in space:
            if key.startswith(_NOT_TUNABLE) or key in _NOT_TUNABLE:
                raise ValueError(f"{key} cannot be tuned (a trial trains one model where the study says)")
        return space

    @model_validator(mode="after")
    def _grid_is_discrete(self) -> "TuneConfig":
        if self.sampler == "grid":
            for key, dim in self.search_space.items():
                if dim.choices is None and not dim.step:
                    raise ValueError(f"tune.sampler=grid: tune.search_space.{key} needs choices or a step")
        return self

    @property
    def maximize(self) -> bool:
        return (self.direction or ("minimize" if self.objective.endswith("loss") else "maximize")) == "maximize"


class TrackingConfig(Section):
    mlflow_uri: str | None = Field(None, description="log every training run to this MLflow tracking server "
                                   "(pip install 'tfpipe[mlflow]'); a tracker that fails never fails the run")
    experiment: str = Field("tfpipe", description="the MLflow experiment the runs go to")
