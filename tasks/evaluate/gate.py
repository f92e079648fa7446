"""What the gate decides: a model is blessed when it passes the absolute thresholds (`evaluate.min_accuracy`,
`min_macro_f1`), is at most `max_regression` less accurate than the champion on the same test split, and (with
`block_on_anomalies`) trained on data without warned anomalies."""

from __future__ import annotations

import logging

from pipeline_config import EvaluateConfig, PipelineConfig
from tasks.errors import PipelineError
from tasks.evaluate.metrics import check_compatible, predict_split
from tasks.model.published import load_model
from tasks.registry.models import resolve_model
from tasks.store.refs import DatasetArtifact, GateReason
from tasks.store.staging import local_file
from tasks.store.storage import join

log = logging.getLogger("tfpipe.evaluate")


def gate(metrics: dict, cfg: EvaluateConfig, champion_accuracy: float | None,
         anomalies: int | None = None) -> tuple[bool, list[GateReason]]:
    """`anomalies`: the training data's (warned) anomalies, counted when evaluate.block_on_anomalies."""
    reasons = [
        GateReason(check="min_accuracy", metric="accuracy", threshold=cfg.min_accuracy, observed=metrics["accuracy"],
                   passed=metrics["accuracy"] >= cfg.min_accuracy),
        GateReason(check="min_macro_f1", metric="macro_f1", threshold=cfg.min_macro_f1, observed=metrics["macro_f1"],
                   passed=metrics["macro_f1"] >= cfg.min_macro_f1),
    ]
    if champion_accuracy is not None:
        floor = champion_accuracy - cfg.max_regression
        reasons.append(GateReason(check="max_regression", metric="accuracy", threshold=floor,
                                  observed=metrics["accuracy"], passed=metrics["accuracy"] >= floor - 1e-12))
    if cfg.block_on_anomalies and anomalies is not None:
        reasons.append(GateReason(check="block_on_anomalies", metric="data anomalies", threshold=0,
                                  observed=anomalies, passed=anomalies == 0))
    return all(r.passed for r in reasons), reasons


def champion_accuracy(cfg: PipelineConfig, champion: dict, dataset: DatasetArtifact,
                       model_fp: str) -> tuple[float | None, str]:
    """The champion's accuracy on this test split: recorded when it was measured on it, else measured now."""
    if not champion:
        return None, "no champion yet: thresholds only"
    if champion["model_fingerprint"] == model_fp:
        return champion["accuracy"] if champion["dataset_fingerprint"] == dataset.fingerprint else None, "model is the champion"
    if champion["dataset_fingerprint"] == dataset.fingerprint and champion.get("accuracy") is not None:
        return champion["accuracy"], f"champion {champion['model_fingerprint'][:12]}"
    uri, manifest = resolve_model(cfg.artifacts.root, champion["model_uri"])
    champion_model = load_model(local_file(join(uri, manifest["model_path"]), cfg.artifacts.local_cache))
    try:
        check_compatible(champion_model, dataset, "champion")
    except PipelineError as exc:
        log.warning("champion cannot be compared on this test split (%s): thresholds only", exc)
        return None, "champion not comparable on this data: thresholds only"
    probs, labels = predict_split(champion_model, dataset, "test", cfg.evaluate.batch_size)
    return float((probs.argmax(1) == labels).mean()), f"champion {champion['model_fingerprint'][:12]} re-measured"
