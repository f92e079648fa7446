"""Deployments: scheduled training, on-demand batch prediction and on-demand tuning, served from one process
(`tfpipe serve`)."""

from __future__ import annotations

import os
from typing import Any

from prefect import serve

from flows.policy import POLICY_ENV, ServePolicy
from flows.prediction import batch_prediction
from flows.training import training_pipeline
from flows.tuning import tuning_flow
from pipeline_config import PipelineConfig

TRAINING_DEPLOYMENT = "scheduled-training"
PREDICTION_DEPLOYMENT = "on-demand"
TUNING_DEPLOYMENT = "on-demand-tuning"


def build_deployments(cfg: PipelineConfig, config_file: str | None, overrides: dict[str, Any]):
    # The served runs use this process's artifact root, whatever their working directory.
    overrides = {**overrides, "artifacts.root": cfg.artifacts.root}
    training = training_pipeline.to_deployment(
        name=TRAINING_DEPLOYMENT, cron=cfg.schedule.cron, parameters={"config_file": config_file, "overrides": overrides},
        description="The whole training pipeline on the configured schedule.", tags=["tfpipe", "training"])
    prediction = batch_prediction.to_deployment(
        name=PREDICTION_DEPLOYMENT, parameters={"config_file": config_file, "overrides": overrides},
        description="Batch prediction on demand: pass model, input and output.", tags=["tfpipe", "prediction"])
    tuning = tuning_flow.to_deployment(
        name=TUNING_DEPLOYMENT, parameters={"config_file": config_file, "overrides": overrides},
        description="A hyperparameter study on demand (the tune section); a run continues its study.",
        tags=["tfpipe", "tuning"])
    if cfg.schedule.timezone != "UTC":
        for schedule in training.schedules or []:
            schedule.schedule.timezone = cfg.schedule.timezone
    return training, prediction, tuning


def serve_policy(cfg: PipelineConfig, config_file: str | None, overrides: dict[str, Any]) -> ServePolicy:
    return ServePolicy.of(cfg, config_file, {**overrides, "artifacts.root": cfg.artifacts.root})


def serve_deployments(cfg: PipelineConfig, config_file: str | None, overrides: dict[str, Any]) -> None:
    # The flow runs this process starts inherit its environment, which no API caller can touch: the policy they
    # check every call's parameters against (flows/policy.py).
    os.environ[POLICY_ENV] = serve_policy(cfg, config_file, overrides).to_env()
    serve(*build_deployments(cfg, config_file, overrides), limit=1)
