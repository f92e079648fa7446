"""Optional MLflow tracking (`tracking.mlflow_uri`, `pip install 'tfpipe[mlflow]'`): every training run, tuned or
not, becomes an MLflow run holding its config as parameters, its fingerprints as tags and each epoch's metrics;
its evaluation adds the test metrics and the model card. The artifact store stays the record: a tracker that
fails (no server, no package, a refused call) logs one warning and the run goes on without it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline_config import PipelineConfig

log = logging.getLogger("tfpipe.tracking")

MODEL_TAG = "tfpipe.model_fingerprint"
PARAM_LIMIT = 6000  # characters MLflow keeps of a parameter's value
BATCH = 100  # parameters per log_batch call (MLflow's limit)


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> values (lists and mappings deeper than sections: their JSON text)."""
    import json

    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[f"{prefix}{key}"] = text[:PARAM_LIMIT]
    return out


class Tracker:
    """One training run's MLflow run. Every method is safe: the first failure disables the tracker."""

    def __init__(self, cfg: PipelineConfig, enabled: bool = True):
        self.cfg, self.client, self.run_id = cfg, None, None
        self.enabled = enabled and bool(cfg.tracking.mlflow_uri)

    def _guard(self, doing: str, call) -> Any:
        if not self.enabled:
            return None
        try:
            return call()
        except Exception as exc:  # ImportError, MlflowException, connection errors: all the tracker's own
            self.enabled = False
            from tasks.errors import first_line

            fix = "pip install 'tfpipe[mlflow]'; " if isinstance(exc, ImportError) else ""
            log.warning("MLflow tracking at %s failed while %s (%s: %s): %sthe run goes on without it",
                        self.cfg.tracking.mlflow_uri, doing, type(exc).__name__, first_line(exc), fix)
            return None

    def start(self, model_fingerprint: str, dataset_fingerprint: str, tags: dict[str, str] | None = None) -> None:
        def start():
            self.client = mlflow_client(self.cfg.tracking.mlflow_uri)
            experiment = experiment_id(self.client, self.cfg.tracking.experiment)
            run = self.client.create_run(experiment, run_name=f"train-{model_fingerprint[:12]}", tags={
                MODEL_TAG: model_fingerprint, "tfpipe.dataset_fingerprint": dataset_fingerprint, **(tags or {})})
            self.run_id = run.info.run_id
            self._log(params=flat_params(self.cfg.model_dump(mode="json", include={"data", "model", "train", "export"})))

        self._guard("starting the run", start)

    def epoch(self, record: dict) -> None:
        metrics = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k not in ("epoch", "epochs", "phase")}
        self._guard(f"logging epoch {record['epoch']}", lambda: self._log(metrics=metrics, step=int(record["epoch"])))

    def end(self, status: str = "FINISHED", note: str | None = None) -> None:
        def end():
            if note:
                self.client.set_tag(self.run_id, "tfpipe.end", note)
            self.client.set_terminated(self.run_id, status)

        if self.run_id:
            self._guard("ending the run", end)

    def _log(self, params: dict | None = None, metrics: dict | None = None, step: int = 0) -> None:
        import time

        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        items = [Param(k, v) for k, v in (params or {}).items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + BATCH])
        if metrics:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


def log_evaluation(cfg: PipelineConfig, model_fingerprint: str, metrics: dict, card_path: str) -> None:
    """The test metrics and the model card, on the newest MLflow run of this model (none: nothing to add to)."""
    tracker = Tracker(cfg)

    def log_card():
        client = mlflow_client(cfg.tracking.mlflow_uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        runs = client.search_runs([experiment.experiment_id], f"tags.`{MODEL_TAG}` = '{model_fingerprint}'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if experiment else []
        if not runs:
            log.info("MLflow: no run of model %s to add its evaluation to", model_fingerprint[:12])
            return
        tracker.client, tracker.run_id = client, runs[0].info.run_id
        tracker._log(metrics={f"test_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        from tasks.store.staging import local_file

        client.log_artifact(tracker.run_id, local_file(card_path, cfg.artifacts.local_cache))

    tracker._guard("logging the evaluation", log_card)


def mlflow_client(uri: str):
    # A tracker that cannot reach its server gives up at once instead of retrying for minutes; the run's URL is
    # not printed on stdout, which holds the command's result alone.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    """The experiment's id, made on first use (two workers making it at once: one wins, both use it)."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
