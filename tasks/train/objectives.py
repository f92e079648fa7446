"""What training minimises and what it reports: the losses, accuracy, and macro precision and recall."""

from __future__ import annotations

import keras
import tensorflow as tf

LABEL_MODES = {"sparse_categorical_crossentropy": "sparse", "categorical_crossentropy": "categorical",
               "binary_crossentropy": "binary"}
METRIC_NAMES = ("loss", "accuracy", "precision", "recall")


@keras.saving.register_keras_serializable(package="tfpipe")
class MacroPrecisionRecall(keras.metrics.Metric):
    """Macro-averaged precision or recall over classes, from a confusion matrix accumulated over batches.

    Works for integer labels, one-hot labels and a single sigmoid unit (two classes). `sample_weight`, when a
    caller passes one, weights each example's count (training passes none: see `make_metrics`).
    """

    def __init__(self, num_classes: int, kind: str = "precision", label_mode: str = "sparse", name=None, **kwargs):
        super().__init__(name=name or kind, **kwargs)
        self.num_classes, self.kind, self.label_mode = num_classes, kind, label_mode
        self.matrix = self.add_variable(shape=(num_classes, num_classes), initializer="zeros", name="matrix",
                                        aggregation="sum")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if self.label_mode == "binary":
            truth = tf.cast(tf.reshape(y_true, [-1]) > 0.5, tf.int32)
            guess = tf.cast(tf.reshape(y_pred, [-1]) > 0.5, tf.int32)
        else:
            truth = tf.argmax(y_true, -1, output_type=tf.int32) if self.label_mode == "categorical" else tf.cast(tf.reshape(y_true, [-1]), tf.int32)
            guess = tf.argmax(y_pred, -1, output_type=tf.int32)
        weights = None if sample_weight is None else tf.cast(tf.reshape(sample_weight, [-1]), self.matrix.dtype)
        self.matrix.assign_add(tf.math.confusion_matrix(truth, guess, self.num_classes, weights=weights,
                                                        dtype=self.matrix.dtype))

    def result(self):
        matrix = tf.convert_to_tensor(self.matrix)
        hits = tf.linalg.diag_part(matrix)
        totals = tf.reduce_sum(matrix, axis=0 if self.kind == "precision" else 1)
        per_class = tf.math.divide_no_nan(hits, totals)
        # Macro average over the classes that occur in the labels or the predictions (as scikit-learn does).
        present = tf.cast(tf.reduce_sum(matrix, axis=0) + tf.reduce_sum(matrix, axis=1) > 0, per_class.dtype)
        return tf.math.divide_no_nan(tf.reduce_sum(per_class * present), tf.reduce_sum(present))

    def reset_state(self):
        self.matrix.assign(tf.zeros_like(self.matrix))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "kind": self.kind, "label_mode": self.label_mode}


def make_loss(name: str, reduction: str | None = "sum_over_batch_size", label_smoothing: float = 0.0) -> keras.losses.Loss:
    if name == "sparse_categorical_crossentropy":  # no label smoothing on integer labels (the config says so)
        return keras.losses.SparseCategoricalCrossentropy(reduction=reduction)
    loss = keras.losses.CategoricalCrossentropy if name == "categorical_crossentropy" else keras.losses.BinaryCrossentropy
    return loss(reduction=reduction, label_smoothing=label_smoothing)


def make_accuracy(loss: str, name: str = "accuracy") -> keras.metrics.Metric:
    return {
        "sparse_categorical_crossentropy": keras.metrics.SparseCategoricalAccuracy,
        "categorical_crossentropy": keras.metrics.CategoricalAccuracy,
        "binary_crossentropy": keras.metrics.BinaryAccuracy,
    }[loss](name=name)


def make_metrics(loss: str, num_classes: int, prefix: str = "") -> list[keras.metrics.Metric]:
    """Accuracy, macro precision and recall: how often the model is right, counted per example in both styles.
    Class weights (train.class_weight) shape the loss only: the custom loop updates these without the weights,
    and fit gets them as `metrics`, which Keras updates without sample weights (`weighted_metrics` would get
    them), so training accuracy reads like val_accuracy and the test accuracy."""
    mode = LABEL_MODES[loss]
    classes = 2 if mode == "binary" else num_classes
    return [make_accuracy(loss, f"{prefix}accuracy"),
            MacroPrecisionRecall(classes, "precision", mode, name=f"{prefix}precision"),
            MacroPrecisionRecall(classes, "recall", mode, name=f"{prefix}recall")]
