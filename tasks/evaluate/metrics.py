"""What evaluation measures: a model's predictions over a split, and every metric from one pass of them and one
confusion matrix, so that the metrics cannot disagree with each other."""

from __future__ import annotations

import numpy as np

from tasks.data.reader import make_dataset
from tasks.errors import PipelineError
from tasks.model.published import class_probabilities, model_input
from tasks.store.refs import DatasetArtifact, class_names
from tasks.validation.drift import confidence_histogram

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
