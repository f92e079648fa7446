"""The whole config: one PipelineConfig of the sections, the stages `rerun` names, and the check that every tuned key
takes each end of its range."""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from pipeline_config.base import ConfigError, Section
from pipeline_config.data import DataConfig, ValidateConfig
from pipeline_config.evaluate import EvaluateConfig, ExportConfig, PredictConfig
from pipeline_config.keys import set_dotted, validation_message
from pipeline_config.model import ModelConfig
from pipeline_config.operations import ArtifactsConfig, ScheduleConfig, ServeConfig
from pipeline_config.train import TrainConfig
from pipeline_config.tune import TrackingConfig, TuneConfig

STAGES = ("ingest", "validate", "train", "evaluate", "predict")


class PipelineConfig(Section):
    rerun: Literal["none", "ingest", "validate", "train", "evaluate", "predict", "all"] = Field(
        "none", description="rebuild this stage and every stage after it even when its output is published")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validate: ValidateConfig = Field(default_factory=ValidateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _search_space_keys(self) -> "PipelineConfig":
        """Every tuned key names a config value that takes each end of its range (each choice): a bad space fails
        here, not in its first trial."""
        base = self.model_dump(mode="json", exclude={"tune"})
        for key, dim in self.tune.search_space.items():
            for value in dim.choices if dim.choices is not None else (dim.low, dim.high):
                value = int(value) if dim.integer else value
                tree = copy.deepcopy(base)
                try:
                    set_dotted(PipelineConfig, tree, key.split("."), value)
                    PipelineConfig.model_validate(tree)
                except (ConfigError, ValidationError) as exc:
                    text = validation_message(PipelineConfig, exc) if isinstance(exc, ValidationError) else str(exc)
                    raise ValueError(f"tune.search_space: {key}={value!r}: {text.removeprefix('config error: ')}") from None
        return self

    def rebuilds(self, stage: str) -> bool:
        """Whether `rerun` asks for `stage` to be rebuilt: the stage named and every stage after it."""
        return self.rerun == "all" or (self.rerun != "none" and STAGES.index(stage) >= STAGES.index(self.rerun))
