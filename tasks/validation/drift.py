"""Skew at prediction: the statistics of the images a model is asked about, and of its answers, against the data it
was trained and evaluated on. Written as a JSON file beside the predictions (`drift: true | false`, then each
figure with its threshold); above a threshold prediction warns, or fails with `predict.on_drift: fail`.

Figures (Jensen-Shannon distance and population stability index of histograms of the same bins): the images'
brightness and contrast against the model's test split (its statistics.json), the predicted labels and the
confidence against the model's latest evaluation on that split. The histograms add up, so the parts of a Dask
prediction merge into one report.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline_config import PipelineConfig
from tasks.errors import PipelineError
from tasks.store import storage
from tasks.validation.statistics import ImageStatistics, histogram_js, psi

log = logging.getLogger("tfpipe.predict")

CONFIDENCE_BINS = 20
DIRECTORY_REPORT = "_drift.json"  # in a Dask output directory; the underscore, as `_manifest.json`'s: Parquet
# dataset readers skip it


def confidence_histogram(confidence: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(confidence, 0.0, 1.0), CONFIDENCE_BINS, (0.0, 1.0))[0]


class InputWatch:
    """What prediction saw, batch by batch: image statistics, predicted labels and confidences."""

    def __init__(self, num_classes: int):
        self.images = ImageStatistics(hashes=False)
        self.labels = np.zeros(num_classes, np.int64)
        self.confidence = np.zeros(CONFIDENCE_BINS, np.int64)

    def update(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        self.images.update(images)
        self.labels += np.bincount(probabilities.argmax(axis=1), minlength=len(self.labels))[: len(self.labels)]
        self.confidence += confidence_histogram(probabilities.max(axis=1))

    def summary(self) -> dict:
        s = self.images
        return {"count": s.count, "brightness_histogram": s.brightness.tolist(), "contrast_histogram": s.contrast.tolist(),
                "predicted_labels": self.labels.tolist(), "confidence_histogram": self.confidence.tolist()}


def merged(summaries: list[dict]) -> dict:
    """The summaries of several parts as one (every figure is a count)."""
    keys = ("brightness_histogram", "contrast_histogram", "predicted_labels", "confidence_histogram")
    return {"count": sum(s["count"] for s in summaries),
            **{k: np.sum([s[k] for s in summaries], axis=0).tolist() for k in keys}}


def references(root: str, manifest: dict) -> dict[str, list | None]:
    """The model's own data for each figure: its dataset's test split, its latest evaluation's predictions."""
    from tasks.registry.models import latest_evaluation
    from tasks.validation.validate import statistics

    stats = statistics(root, manifest["dataset_fingerprint"]) or {"splits": {}}
    test = stats["splits"].get("test", {})
    evaluation = latest_evaluation(root, manifest["fingerprint"])
    metrics = storage.read_json(f"{evaluation['uri']}/{evaluation['metrics_path']}") if evaluation else {}
    matrix = metrics.get("confusion_matrix")
    return {"brightness_histogram": test.get("brightness_histogram"), "contrast_histogram": test.get("contrast_histogram"),
            "predicted_labels": np.sum(matrix, axis=0).tolist() if matrix else None,
            "confidence_histogram": metrics.get("confidence_histogram")}


def drift_report(cfg: PipelineConfig, manifest: dict, seen: dict) -> dict:
    """Each figure against its reference and threshold; `drift` when any is above (and there were enough images)."""
    pc = cfg.predict
    figures = {}
    for name, reference in references(cfg.artifacts.root, manifest).items():
        if reference is None:
            figures[name] = {"compared": False, "why": "the model's data has no such record"}
            continue
        js, index = histogram_js(reference, seen[name]), psi(reference, seen[name])
        figures[name] = {"js_distance": round(js, 4), "max_js_distance": pc.drift_max_js_distance, "psi": round(index, 4),
                         "max_psi": pc.drift_max_psi, "drift": js > pc.drift_max_js_distance or index > pc.drift_max_psi}
    enough = seen["count"] >= pc.drift_min_images
    drift = enough and any(f.get("drift") for f in figures.values())
    return {"drift": drift, "judged": enough, "images": seen["count"], "min_images": pc.drift_min_images,
            "model_fingerprint": manifest["fingerprint"], "dataset_fingerprint": manifest["dataset_fingerprint"],
            "figures": figures, "seen": seen}


def drift_path(output: str) -> str:
    """Beside the predictions: `X.parquet` -> `X.drift.json`; a Dask output directory holds DIRECTORY_REPORT."""
    return output.removesuffix(".parquet") + ".drift.json" if output.endswith(".parquet") \
        else f"{output.rstrip('/')}/{DIRECTORY_REPORT}"


def check_drift(cfg: PipelineConfig, report: dict, where: str) -> None:
    """Warn of drift, or fail (predict.on_drift: fail) before the predictions are published."""
    if not report["drift"]:
        return
    moved = ", ".join(f"{name} (JS {f['js_distance']:.3f}, PSI {f['psi']:.3f})"
                      for name, f in report["figures"].items() if f.get("drift"))
    message = (f"the inputs of {where} drifted from model {report['model_fingerprint'][:12]}'s data: {moved}; "
               f"thresholds predict.drift_max_js_distance={cfg.predict.drift_max_js_distance}, "
               f"predict.drift_max_psi={cfg.predict.drift_max_psi}")
    if cfg.predict.on_drift == "fail":
        raise PipelineError(message + "; nothing was published (predict.on_drift=warn publishes with a warning)")
    log.warning("%s", message)
