"""The evaluate stage: measure the model on the test split (metrics.py), apply the gate (gate.py), publish the
metrics and figures (plots.py) through the one reuse-or-publish path, and move the champion when the model is
blessed: `<root>/champion.json` is replaced atomically and keeps the previous champions in its history. The
model card (model_card.py) is written after every evaluation.
"""

from __future__ import annotations

import logging
import time

from pipeline_config import PipelineConfig, fingerprint
from tasks.evaluate.gate import champion_accuracy, gate
from tasks.evaluate.metrics import check_compatible, classification_metrics, predict_split
from tasks.evaluate.model_card import write_model_card
from tasks.evaluate.plots import plot_confusion_matrix, plot_training_curves
from tasks.model.published import load_model
from tasks.registry.champion import current_champion
from tasks.registry.decisions import promote
from tasks.store import storage
from tasks.store.publish import reuse_or_publish
from tasks.store.refs import DatasetArtifact, EvaluationArtifact, GateReason, ModelArtifact, class_names
from tasks.store.staging import local_dataset, local_file
from tasks.store.storage import join
from tasks.tracking import log_evaluation

log = logging.getLogger("tfpipe.evaluate")

EVAL_CODE_VERSION = "1"
STAGE = "evaluate"


def evaluate(cfg: PipelineConfig, dataset: DatasetArtifact, model_artifact: ModelArtifact,
             anomalies: list[dict] | None = None) -> EvaluationArtifact:
    """Metrics on the test split, the gate decision, and the champion pointer moved if blessed. `anomalies`: the
    validate stage's, for evaluate.block_on_anomalies (None: the data was not validated)."""
    root = cfg.artifacts.root
    champion = current_champion(root) or {}
    counted = len(anomalies) if anomalies is not None and cfg.evaluate.block_on_anomalies else None
    fp = fingerprint({"model": model_artifact.fingerprint, "dataset": dataset.fingerprint,
                      "evaluate": cfg.evaluate.model_dump(mode="json", exclude=set() if counted is not None else
                                                          {"block_on_anomalies"}), "champion": champion.get("model_fingerprint"),
                      "code": EVAL_CODE_VERSION, **({"anomalies": counted} if counted is not None else {})})
    published = reuse_or_publish(root, STAGE, fp, lambda out: measure(cfg, dataset, model_artifact, champion, out, counted),
                                 rebuild=cfg.rebuilds(STAGE))
    manifest = published.manifest
    if published.cache_hit:
        log.info("evaluate cache hit: %s", published.uri)
    if manifest["blessed"]:
        promote(root, {"model_fingerprint": model_artifact.fingerprint, "model_uri": model_artifact.uri,
                       "dataset_fingerprint": dataset.fingerprint, "accuracy": manifest["metrics"]["accuracy"],
                       "evaluation_uri": published.uri, "promoted_at": time.time()})
    reasons = [GateReason(**r) for r in manifest["reasons"]]
    log.info("gate: %s (%s)", "blessed" if manifest["blessed"] else "NOT blessed", "; ".join(r.describe() for r in reasons))
    evaluation = EvaluationArtifact(
        uri=published.uri, fingerprint=fp, cache_hit=published.cache_hit, model_fingerprint=model_artifact.fingerprint,
        dataset_fingerprint=dataset.fingerprint, metrics=manifest["metrics"], blessed=manifest["blessed"],
        reasons=reasons, champion_before=manifest["champion_before"],
        champion_after=(current_champion(root) or {}).get("model_fingerprint"),
        metrics_path=manifest["metrics_path"], plots=manifest["plots"])
    card = write_model_card(cfg, dataset, model_artifact, evaluation)
    log.info("model card: %s", card)
    if cfg.tracking.mlflow_uri:
        log_evaluation(cfg, model_artifact.fingerprint, manifest["metrics"], card)
    return evaluation


def measure(cfg: PipelineConfig, dataset: DatasetArtifact, model_artifact: ModelArtifact, champion: dict,
            out: str, anomalies: int | None = None) -> dict:
    """Test-split metrics, the gate against `champion`, metrics.json and the plots in `out`; the manifest body."""
    started = time.perf_counter()
    cache_dir = cfg.artifacts.local_cache
    model = load_model(local_file(join(model_artifact.uri, model_artifact.model_path), cache_dir))
    check_compatible(model, dataset)
    dataset = local_dataset(dataset, cache_dir)
    probs, labels = predict_split(model, dataset, "test", cfg.evaluate.batch_size)
    metrics = classification_metrics(labels, probs, dataset.label_names)
    reference, compared = champion_accuracy(cfg, champion, dataset, model_artifact.fingerprint)
    blessed, reasons = gate(metrics, cfg.evaluate, reference, anomalies)
    history = storage.read_json(join(model_artifact.uri, model_artifact.history_path))["epochs"]
    storage.write_json(join(out, "metrics.json"), metrics)
    names = class_names(dataset.label_names, len(metrics["confusion_matrix"]))
    plot_confusion_matrix(metrics["confusion_matrix"], names, join(out, "confusion_matrix.png"))
    plot_training_curves(history, join(out, "training_curves.png"))
    return {"model_fingerprint": model_artifact.fingerprint, "dataset_fingerprint": dataset.fingerprint,
            "metrics": metrics, "blessed": blessed, "reasons": [r.model_dump() for r in reasons],
            "compared_with": compared, "champion_before": champion.get("model_fingerprint"),
            "metrics_path": "metrics.json", "plots": ["confusion_matrix.png", "training_curves.png"],
            "seconds": time.perf_counter() - started}
