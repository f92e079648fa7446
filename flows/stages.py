"""Thin Prefect task wrappers over the plain stage functions in `tasks/`, plus what they show in the dashboard.

Tasks pass small artifact references, never TF objects. Prefect's own input hashing is off (NO_CACHE): each
stage is content-addressed in the artifact store, and a stage that finds its output already published returns
a `Cached` state, so a re-run shows the skipped stages as Cached in the UI and in the API.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from flows import dashboard
from flows.retry import retry_transient
from pipeline_config import PipelineConfig
from tasks.train.worker import ingest_for
from tasks.evaluate import stage as evaluate_stage
from tasks.evaluate.model_card import CARD_MD, pixel_parity_line
from tasks.serve import predict as predict_stage
from tasks.store import storage
from tasks.store.refs import (DatasetArtifact, EvaluationArtifact, ModelArtifact, PredictionArtifact,
                              ValidationArtifact, class_names)
from tasks.store.storage import join
from tasks.train import stage as train_stage
from tasks.validation import validate as validate_stage


def resolved(value):
    """A stage's result: tasks that reused their output return a Cached state, whose data is the artifact."""
    return value.result() if isinstance(value, State) else value


def _finish(artifact, what: str):
    """A Cached state for a stage that reused its published output, else the plain return value."""
    if artifact.cache_hit:
        get_run_logger().info("%s skipped: output already published at %s", what, artifact.uri)
        return Completed(name="Cached", message=f"{what} reused {artifact.uri}", data=artifact)
    return artifact


@task(name="ingest", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def ingest_task(cfg: PipelineConfig) -> DatasetArtifact:
    """Source -> verified TFRecord cache. Retried: reading a source is I/O that can fail transiently."""
    dataset = ingest_for(cfg)
    dashboard.tag_run(f"dataset:{dataset.fingerprint[:12]}")
    return _finish(dataset, "ingest")


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(cfg: PipelineConfig, dataset: DatasetArtifact) -> ValidationArtifact:
    """The dataset's statistics against the schema and the champion's data: a table per split and one of the
    anomalies on the dashboard; fails on the anomalies validate.on_anomaly says fail."""
    validation = validate_stage.validate(cfg, dataset)
    report = storage.read_json(join(validation.uri, validation.report_path))
    dashboard.table("data-statistics", description="the dataset's statistics per split", rows=[
        {"split": split, "images": s["count"], "brightness mean": round(s["brightness_mean"], 2),
         "channel mean": ", ".join(f"{v:.1f}" for v in s["channel_mean"]), "near-blank": s["blank_images"],
         "duplicates": s["duplicate_images"], **{f"in {pair}": n for pair, n in report["leakage"].items()
                                                  if pair.startswith(split + "/")}}
        for split, s in report["statistics"].items()])
    dashboard.markdown("data-validation", description="data anomalies", text="\n".join([
        f"# Data validation of `{dataset.fingerprint[:12]}`", f"- schema: {validation.schema_source}",
        f"- compared with: `{(validation.reference_fingerprint or 'nothing (no champion on other data)')[:12]}`",
        f"- brightness per split, dark to bright ([plot]({join(validation.uri, validation.plot_path)})):",
        *[f"  - {split}: `{sparkline(s['brightness_histogram'])}`" for split, s in report["statistics"].items()],
        *(["- source image sizes (longer side): " + ", ".join(f"{k} {v}" for k, v in report["source_sizes"].items())]
          if report.get("source_sizes") else []),
        "", "| kind | anomaly | action |", "| --- | --- | --- |",
        *[f"| {a['kind']} | {a['message']} | {a['action']} |" for a in validation.anomalies]]
        + ([] if validation.anomalies else ["| | none | |"])))
    return _finish(validation, "validate")


def sparkline(histogram: list[int]) -> str:
    """A histogram as a line of block characters: a plot the dashboard's markdown shows inline."""
    top = max(max(histogram), 1)
    return "".join(" ▁▂▃▄▅▆▇█"[round(8 * n / top)] for n in histogram)


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: PipelineConfig, dataset: DatasetArtifact) -> ModelArtifact:
    """Train under the configured strategy. Not retried here: an interrupted run resumes on the next flow run.
    The stage logs one line per epoch (forwarded into the run's logs); the task moves the progress artifact."""
    progress = dashboard.progress("training-progress", f"epochs of train.epochs={cfg.train.epochs}")
    model = train_stage.train(cfg, dataset, on_epoch=lambda r: progress(100.0 * r["epoch"] / r["epochs"]))
    progress(100.0)
    dashboard.tag_run(f"model:{model.fingerprint[:12]}")
    history = storage.read_json(join(model.uri, model.history_path))["epochs"]
    dashboard.table("training-history", description="one row per epoch", rows=[history_row(h) for h in history])
    return _finish(model, "train")


def history_row(epoch: dict) -> dict:
    """One epoch of history.json as a dashboard row; the column names sort into reading order on the page."""
    keys = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second")
    return {"epoch": epoch["epoch"], **{k: round(float(epoch[k]), 6) for k in keys if k in epoch}}


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, dataset: DatasetArtifact, model: ModelArtifact,
                  validation: ValidationArtifact | None = None) -> EvaluationArtifact:
    """Test-split metrics and the promotion gate; publishes metric and confusion-matrix tables."""
    evaluation = evaluate_stage.evaluate(cfg, dataset, model, validation.anomalies if validation else None)
    metrics = evaluation.metrics
    dashboard.table("evaluation-metrics", description="test-split metrics and gate checks", rows=[
        {"metric": k, "value": round(metrics[k], 6)} for k in ("accuracy", "loss", "macro_precision", "macro_recall", "macro_f1")
    ] + [{"metric": f"gate {r.describe()}", "value": "pass" if r.passed else "FAIL"} for r in evaluation.reasons])
    dashboard.table("confusion-matrix", description="one row per actual class; columns: how often it was predicted "
                    "as each class", rows=confusion_rows(metrics["confusion_matrix"], dataset.label_names))
    return evaluation


def confusion_rows(matrix: list[list[int]], label_names: list[str] | None) -> list[dict]:
    """The UI orders a table's columns by name: `actual class` sorts before `predicted 0..`, and the predicted
    class indices are zero-padded so that 10 comes after 9."""
    names = class_names(label_names, len(matrix))
    width = len(str(len(matrix) - 1))

    def column(j: int) -> str:
        return f"predicted {j:0{width}d}" + ("" if names[j] == str(j) else f" {names[j]}")

    return [{"actual class": names[i], **{column(j): v for j, v in enumerate(row)}} for i, row in enumerate(matrix)]


@task(name="predict", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def predict_task(cfg: PipelineConfig, dataset: DatasetArtifact, evaluation: EvaluationArtifact) -> PredictionArtifact | None:
    """Batch predictions from the champion on `predict.input` (default: the test split) into the store."""
    if evaluation.champion_after is None:
        get_run_logger().warning("no champion: the gate blessed no model yet, so no batch predictions were made")
        return None
    return _finish(predict_stage.batch_predict(cfg, evaluation.champion_after, dataset), "predict")


def report_markdown(dataset: DatasetArtifact, model: ModelArtifact, evaluation: EvaluationArtifact,
                    prediction: PredictionArtifact | None, validation: ValidationArtifact | None = None) -> str:
    m = evaluation.metrics
    last = model.final_metrics
    lines = [
        "# tfpipe training run",
        "## Data",
        f"- source: `{dataset.source}`; fingerprint `{dataset.fingerprint[:12]}`{' (cache hit)' if dataset.cache_hit else ''}",
        f"- images {dataset.image_shape}, {dataset.num_classes} classes; "
        + ", ".join(f"{split} {count}" for split, count in dataset.counts.items()),
        *([f"- validation: {len(validation.anomalies)} anomalies"
           + "".join(f"; {a['kind']} ({a['action']}): {a['message']}" for a in validation.anomalies)
           + f" ([report]({join(validation.uri, validation.report_path)}))"] if validation else []),
        "## Model",
        f"- fingerprint `{model.fingerprint[:12]}`{' (cache hit)' if model.cache_hit else ''}; mode `{model.mode}`, "
        f"loss `{model.loss}`, {model.epochs} epochs",
        f"- {model.strategy} over {model.replicas} replica(s), global batch {model.global_batch_size} "
        f"({model.per_replica_batch_size} per replica), precision `{model.precision}` ({model.precision_reason})",
        f"- last epoch: accuracy {last.get('accuracy', float('nan')):.4f}, val_accuracy {last.get('val_accuracy', float('nan')):.4f}",
        "## Test metrics",
        "| metric | value |", "| --- | --- |",
        *[f"| {k} | {m[k]:.4f} |" for k in ("accuracy", "loss", "macro_precision", "macro_recall", "macro_f1")],
        "## Promotion gate",
        f"**{'BLESSED' if evaluation.blessed else 'NOT BLESSED'}**; champion now `{(evaluation.champion_after or 'none')[:12]}`",
        "| check | metric | observed | threshold | result |", "| --- | --- | --- | --- | --- |",
        *[f"| {r.check} | {r.metric} | {r.observed:.4f} | {r.threshold:.4f} | {'pass' if r.passed else 'FAIL'} |"
          for r in evaluation.reasons],
        "## Serving formats (checked against Keras on test images)",
        "| format | file | label agreement | largest probability difference |", "| --- | --- | --- | --- |",
        *[f"| {name} | `{entry['path']}` | {figures['label_agreement']:.2%} of {figures['samples']} | "
          f"{figures['max_abs_diff']:.2g} |" for name, entry in model.exports.items()
          for figures in [entry["parity"]]],
        *([pixel_parity_line(model.exports["saved_model"]["parity_pixels"])]
          if "parity_pixels" in model.exports.get("saved_model", {}) else []),
        "## Artifacts",
        f"- dataset: `{dataset.uri}`",
        f"- model: `{join(model.uri, model.model_path)}`; its card: `{join(model.uri, CARD_MD)}`"
        + (f"; started from model `{model.init_from['fingerprint'][:12]}`" if model.init_from else ""),
        f"- evaluation: `{evaluation.uri}`: " + ", ".join(f"[{p}]({join(evaluation.uri, p)})"
                                                         for p in [evaluation.metrics_path, *evaluation.plots]),
        f"- predictions: `{prediction.output}` ({prediction.rows} rows)" if prediction else "- predictions: none (no champion)",
    ]
    return "\n".join(lines)


@task(name="report", cache_policy=NO_CACHE)
def report_task(dataset: DatasetArtifact, model: ModelArtifact, evaluation: EvaluationArtifact,
                prediction: PredictionArtifact | None, validation: ValidationArtifact | None = None) -> str:
    """The run report on the Artifacts page."""
    markdown = report_markdown(dataset, model, evaluation, prediction, validation)
    dashboard.markdown("training-report", markdown, description="tfpipe training run report")
    return markdown
