"""The on-demand batch prediction flow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dashboard
from flows.stages import retry_transient
from pipeline_config import load_config
from tasks import predict as predict_stage
from tasks.artifacts import PredictionArtifact


@task(name="predict", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def batch_predict_task(config_file: str | None, overrides: dict[str, Any] | None, model: str, input: str,
                       output: str, allow_unblessed: bool) -> PredictionArtifact:
    cfg = load_config(config_file, overrides)
    return predict_stage.predict(cfg, model, input, output, allow_unblessed=allow_unblessed)


@flow(name="batch-prediction")
def batch_prediction(model: str = "champion", input: str = "data/mnist/test.parquet", output: str = "predictions.parquet",
                     allow_unblessed: bool = False, config_file: str | None = None,
                     overrides: dict[str, Any] | None = None) -> PredictionArtifact:
    artifact = batch_predict_task(config_file, overrides, model, input, output, allow_unblessed)
    get_run_logger().info("wrote %d predictions to %s", artifact.rows, artifact.output)
    dashboard.markdown("batch-prediction", description="latest on-demand batch prediction", text=(
        f"# Batch prediction\n- model `{artifact.model_fingerprint[:12]}`\n- input `{artifact.input}`\n"
        f"- output `{artifact.output}`: {artifact.rows} rows, sha256 `{artifact.sha256[:16]}`\n"))
    dashboard.drain()
    return artifact
