"""The training pipeline: ingest -> validate -> train -> evaluate (gate) -> batch predict, each stage a Prefect task."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows import dashboard
from flows.policy import served_call
from flows.stages import evaluate_task, ingest_task, predict_task, report_task, resolved, train_task, validate_task
from pipeline_config import PipelineConfig, load_config
from tasks.distributed.cluster import cluster_from_env
from tasks.distributed.devices import configure_devices
from tasks.model.build import check_model_config
from tasks.store.refs import DatasetArtifact, EvaluationArtifact, ModelArtifact, PredictionArtifact, ValidationArtifact
from tasks.store.storage import check_reachable


class RunSummary(BaseModel):
    dataset: DatasetArtifact
    validation: ValidationArtifact
    model: ModelArtifact
    evaluation: EvaluationArtifact | None  # None on a multi_worker worker other than the chief
    prediction: PredictionArtifact | None
    seconds: float


@flow(name="training-pipeline")
def training_pipeline(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                      rerun: str | None = None) -> RunSummary:
    """`rerun`: a stage (ingest, validate, train, evaluate, predict, all) rebuilt with the stages after it, even when published."""
    started = time.perf_counter()
    config_file, overrides = served_call(config_file, overrides, rerun=rerun)  # under tfpipe serve: what callers may set
    cfg = load_config(config_file, {**(overrides or {}), **({"rerun": rerun} if rerun else {})})
    check_reachable(cfg.artifacts.root)  # a wrong bucket or missing credentials: one line, before any work
    configure_devices(cfg.train)  # before the first TensorFlow op of this process (multi_worker: the strategy)
    check_model_config(cfg)  # a bad model.layers fails here, before ingest does any work
    try:
        return _stages(cfg, started)
    finally:
        dashboard.drain()  # the run's last dashboard updates land before it ends (bounded: the server may be gone)


def _stages(cfg: PipelineConfig, started: float) -> RunSummary:
    # 1. ingest: the source becomes a verified, content-addressed TFRecord cache (and its statistics).
    dataset = ingest_task(cfg)
    # 2. validate: the statistics against the schema and the champion's data; leakage stops the run here.
    validation = validate_task(cfg, dataset)
    # 3. model + train: build the configured CNN and train it under the distribution strategy.
    model = train_task(cfg, dataset)
    # Under multi_worker every worker trains; the chief alone evaluates, predicts and reports.
    if cfg.train.in_cluster and cluster_from_env()[0] != 0:
        get_run_logger().info("worker %d: training done; the chief evaluates and predicts", cluster_from_env()[0])
        return RunSummary(dataset=resolved(dataset), validation=resolved(validation), model=resolved(model),
                          evaluation=None, prediction=None, seconds=time.perf_counter() - started)
    # 4. evaluate: test-split metrics and the promotion gate; a blessed model becomes the champion.
    evaluation = evaluate_task(cfg, dataset, model, validation)
    # 5. predict: batch predictions from the champion, streamed to Parquet.
    prediction = predict_task(cfg, dataset, evaluation)
    # The run report on the dashboard's Artifacts page.
    report_task(dataset, model, evaluation, prediction, validation)

    return RunSummary(dataset=resolved(dataset), validation=resolved(validation), model=resolved(model),
                      evaluation=evaluation, prediction=resolved(prediction), seconds=time.perf_counter() - started)
