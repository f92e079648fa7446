"""The one configuration schema of tfpipe, which holds every default.

Every stage reads its own section. A config is the default YAML, optionally a user YAML merged over it, the
environment (TFPIPE__SECTION__KEY), then dotted `--set key=value` overrides; unknown keys and wrong types are
rejected before any work is done, in one line naming the key.

- base.py: Section (what every section is made of) and ConfigError;
- data.py (`data`, `data.augment`, `validate`), model.py (`model`), train.py (`train`), evaluate.py (`evaluate`,
  `export`, `predict`), tune.py (`tune`, `tracking`), operations.py (`artifacts`, `schedule`, `serve`);
- schema.py: PipelineConfig, the sections together; keys.py: dotted keys and error lines;
- loading.py: files, the environment and `--set` into a PipelineConfig; fingerprints.py: `fingerprint`.

This module re-exports what the rest of tfpipe imports.
"""

from pipeline_config.base import ConfigError, Section
from pipeline_config.data import (ANOMALY_ACTIONS, ANOMALY_KINDS, SOURCE_SCHEMES, AugmentConfig, DataConfig,
                                  ValidateConfig)
from pipeline_config.evaluate import EvaluateConfig, ExportConfig, PredictConfig
from pipeline_config.fingerprints import fingerprint
from pipeline_config.keys import parse_override
from pipeline_config.loading import DEFAULT_CONFIG_PATH, ENV_PREFIX, environment_overrides, load_config, user_settings
from pipeline_config.model import BACKBONES, DEFAULT_LAYERS, BackboneConfig, LayerSpec, ModelCardConfig, ModelConfig
from pipeline_config.operations import ArtifactsConfig, ScheduleConfig, ServeConfig
from pipeline_config.schema import STAGES, PipelineConfig
from pipeline_config.train import EarlyStoppingConfig, LrScheduleConfig, OptimizerConfig, PhaseConfig, TrainConfig
from pipeline_config.tune import SearchDimension, TrackingConfig, TuneConfig

__all__ = [
    "ANOMALY_ACTIONS", "ANOMALY_KINDS", "ArtifactsConfig", "AugmentConfig", "BACKBONES", "BackboneConfig", "ConfigError",
    "DEFAULT_CONFIG_PATH", "DEFAULT_LAYERS", "DataConfig", "ENV_PREFIX", "EarlyStoppingConfig", "EvaluateConfig",
    "ExportConfig", "LayerSpec", "LrScheduleConfig", "ModelCardConfig", "ModelConfig", "OptimizerConfig", "PhaseConfig",
    "PipelineConfig", "PredictConfig", "SOURCE_SCHEMES", "STAGES", "ScheduleConfig", "SearchDimension", "Section",
    "ServeConfig", "TrackingConfig", "TrainConfig", "TuneConfig", "ValidateConfig", "environment_overrides",
    "fingerprint", "load_config", "parse_override", "user_settings",
]
