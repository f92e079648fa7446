"""Stage 4, evaluate: measure the model on the test split and decide whether it becomes the champion.

Every metric comes from one pass of predictions and one confusion matrix, so they cannot disagree with each
other. The gate checks absolute thresholds and, when there is a champion, that the challenger is at most
`max_regression` less accurate than the champion on the same test split. A blessed model becomes the
champion: `<root>/champion.json` is replaced atomically and keeps the previous champions in its history.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipeline_config import EvaluateConfig, PipelineConfig, fingerprint
from tasks import storage
from tasks.artifacts import (DatasetArtifact, EvaluationArtifact, GateReason, ModelArtifact, class_names,
                             local_dataset, local_file, reuse_or_publish)
from tasks.champion import current_champion, promote, resolve_model
from tasks.errors import PipelineError
from tasks.model import class_probabilities, load_model, model_input
from tasks.drift import confidence_histogram
from tasks.model_card import write_model_card
from tasks.tracking import log_evaluation
from tasks.storage import join

log = logging.getLogger("tfpipe.evaluate")

EVAL_CODE_VERSION = "1"
STAGE = "evaluate"
EPSILON = 1e-7  # the clip Keras applies to probabilities in its crossentropy losses


def check_compatible(model, dataset: DatasetArtifact, what: str = "model") -> None:
    """The model must take the dataset's image shape and predict its number of classes."""
    expected = list(model.input_shape[1:])
    if expected != list(dataset.image_shape):
        raise PipelineError(f"{what} expects images of shape {expected} but the dataset {dataset.fingerprint[:12]} has "
                            f"{dataset.image_shape}: evaluate on data of the shape it was trained on")
    units = model.output_shape[-1]
    classes = 2 if units == 1 else units
    if classes != dataset.num_classes:
        raise PipelineError(f"{what} predicts {classes} classes but the dataset {dataset.fingerprint[:12]} has "
                            f"{dataset.num_classes}: evaluate on data with the same classes")


def predict_split(model, dataset: DatasetArtifact, split: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities [n, classes], labels [n]) over one split, in stored order."""
    import tensorflow as tf

    from tasks.reader import make_dataset

    ds = make_dataset(dataset, split, batch_size, label_mode="sparse")  # a local (staged) dataset
    forward = tf.function(lambda x: model(model_input(model, x), training=False))
    probs, labels = [], []
    for images, y in ds:
        probs.append(forward(images).numpy())
        labels.append(y.numpy())
    return class_probabilities(np.concatenate(probs).astype(np.float64)), np.concatenate(labels)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, label_names: list[str] | None = None) -> dict:
    """Loss, accuracy, macro and per-class precision / recall / F1 and the confusion matrix, from predictions."""
    num_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    matrix = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    hits = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    precision = np.divide(hits, predicted_count, out=np.zeros(num_classes), where=predicted_count > 0)
    recall = np.divide(hits, support, out=np.zeros(num_classes), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(num_classes), where=both > 0)
    present = (support + predicted_count) > 0  # macro over classes seen in labels or predictions
    true_probs = np.clip(probs[np.arange(len(labels)), labels], EPSILON, 1.0)
    names = class_names(label_names, num_classes)
    return {
        "count": int(len(labels)),
        "loss": float(-np.log(true_probs).mean()),
        "accuracy": float(hits.sum() / max(len(labels), 1)),
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": [{"class": i, "name": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
                       "f1": float(f1[i]), "support": int(support[i])} for i in range(num_classes)],
        "confusion_matrix": matrix.tolist(),
        "confidence_histogram": confidence_histogram(probs.max(axis=1)).tolist(),  # prediction's drift reference
    }


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


def _champion_accuracy(cfg: PipelineConfig, champion: dict, dataset: DatasetArtifact,
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


def plot_confusion_matrix(matrix: list[list[int]], names: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.6 * len(names)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > m.max() / 2 else "black")
    ax.set_title("confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_curves(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [h.get(metric) for h in history], marker="o", label="train")
        ax.plot(epochs, [h.get(f"val_{metric}") for h in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    champion_accuracy, compared = _champion_accuracy(cfg, champion, dataset, model_artifact.fingerprint)
    blessed, reasons = gate(metrics, cfg.evaluate, champion_accuracy, anomalies)
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
