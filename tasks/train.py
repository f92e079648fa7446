"""Stage 3, train: fit the model on the TFRecord cache under a distribution strategy, resumably.

Two styles, as in the seed: `fit` (compile + fit) and `custom` (the expert GradientTape loop run through
`strategy.run`). Both checkpoint at the end of every epoch in `<root>/train/.work-<fingerprint>/`; an
interrupted run with the same fingerprint resumes from the last completed epoch with its optimizer state.
The finished model is published to `<root>/train/<fingerprint>/`.

The steps: `train` (cache or train, publish) -> `start_run` (seeds, inputs, model and optimizer in the strategy
scope, as a TrainingRun) -> `EpochRecorder.resume` -> `run_epochs` (fit or the custom loop, with
`EpochRecorder.end_epoch` after each epoch) -> `save_outputs`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline_config import PipelineConfig, fingerprint
from tasks import storage
from tasks.artifacts import (DatasetArtifact, ModelArtifact, Published, find_published, is_local, join, local_dataset,
                             read_json, remove_tree, reuse_or_publish, stage_dir, write_json_atomic)
from tasks.cluster import barrier, is_multi_worker, lost_worker_errors, run_local_workers, worker_role
from tasks.devices import make_strategy, resolve_precision, strategy_devices, strategy_name
from tasks.errors import PipelineError, Stopped
from tasks.model import build_model, portable_copy
from tasks.progress import on_terminal, progress_bar
from tasks.reader import batch_count, make_dataset, per_worker_dataset_fn

log = logging.getLogger("tfpipe.train")

TRAIN_CODE_VERSION = "4"  # 2: epoch k shuffled by train.seed + k (exact resume); 3: per-worker augmentation streams;
# 4: whole batches only on several replicas
STAGE = "train"
LABEL_MODES = {"sparse_categorical_crossentropy": "sparse", "categorical_crossentropy": "categorical",
               "binary_crossentropy": "binary"}
METRIC_NAMES = ("loss", "accuracy", "precision", "recall")

EpochCallback = Callable[[dict], None]


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


def learning_rate(cfg: PipelineConfig, steps_per_epoch: int):
    """train.optimizer.learning_rate shaped by train.lr_schedule, in optimizer steps (restored with the optimizer's
    iteration count, so a resumed run continues on the same curve)."""
    rate, sc, epochs = cfg.train.optimizer.learning_rate, cfg.train.lr_schedule, cfg.train.epochs
    if sc.name == "cosine":
        warmup = int(round(sc.warmup_epochs * steps_per_epoch))
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else rate, decay_steps=epochs * steps_per_epoch - warmup, alpha=sc.min_lr / rate,
            warmup_target=rate if warmup else None, warmup_steps=warmup)
    if sc.name == "step" and sc.boundaries:
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            # the first step of epoch b + 1 is step b * steps_per_epoch, past the boundary (Keras: step > boundary)
            [b * steps_per_epoch - 1 for b in sc.boundaries], [rate * sc.factor ** i for i in range(len(sc.boundaries) + 1)])
    return rate


def make_optimizer(cfg: PipelineConfig, precision: str, steps_per_epoch: int = 1) -> keras.optimizers.Optimizer:
    opt = cfg.train.optimizer
    rate = learning_rate(cfg, steps_per_epoch)
    common = {"clipnorm": opt.clipnorm, "weight_decay": opt.weight_decay}
    if opt.name == "sgd":
        optimizer = keras.optimizers.SGD(rate, momentum=opt.momentum, **common)
    elif opt.name == "rmsprop":
        optimizer = keras.optimizers.RMSprop(rate, **common)
    elif opt.weight_decay:
        optimizer = keras.optimizers.AdamW(rate, weight_decay=opt.weight_decay, clipnorm=opt.clipnorm)
    else:
        optimizer = keras.optimizers.Adam(rate, clipnorm=opt.clipnorm)
    if precision == "mixed_float16":  # fp16 gradients underflow without loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate the optimizer applies at its current step."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(keras.ops.convert_to_numpy(inner.learning_rate))


def train_fingerprint(cfg: PipelineConfig, dataset: DatasetArtifact, precision: str) -> str:
    train = cfg.train.model_dump(mode="json")
    train["precision"] = precision  # `auto` resolves per machine: key on what actually trains
    if train["local_workers"]:  # the launcher and the workers it starts name the same model
        train.update(strategy="multi_worker", local_workers=None)
    return fingerprint({"dataset": dataset.fingerprint, "model": cfg.model.model_dump(mode="json"), "train": train,
                        "shuffle_buffer": cfg.data.shuffle_buffer, "augment": cfg.data.augment.model_dump(mode="json"),
                        "code": TRAIN_CODE_VERSION})


def class_weights(cfg: PipelineConfig, dataset: DatasetArtifact) -> list[float] | None:
    """train.class_weight as one weight per class index: `balanced` is n / (classes * count of the class) over
    the training split's class histogram (scikit-learn's rule), a mapping sets some classes (the rest weigh 1)."""
    setting, classes = cfg.train.class_weight, dataset.num_classes
    if setting == "none":
        return None
    if setting == "balanced":
        counts = np.asarray(dataset.class_histograms.get("train", []), np.float64)
        if len(counts) != classes:
            raise PipelineError(f"train.class_weight=balanced needs the class histogram of {dataset.uri}, which "
                                f"its manifest lacks: run ingest again with --rerun ingest")
        return [float(counts.sum() / (classes * c)) if c else 0.0 for c in counts]
    unknown = sorted(k for k in setting if k >= classes)
    if unknown:
        raise PipelineError(f"train.class_weight names class {unknown[0]}, but the dataset has {classes} classes "
                            f"(0-{classes - 1}): fix the mapping")
    return [float(setting.get(k, 1.0)) for k in range(classes)]


class StopRequest:
    """SIGTERM (what Kubernetes, `prefect flow-run cancel` and `kill` send) asks training to stop at the next
    step, save a checkpoint and exit. Installed while training runs, in the main thread only (where Python
    delivers signals); under multi_worker the workers stop together through the collective timeout instead."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        log.warning("%s received: stopping at the next step, after saving a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def model_artifact(uri: str, manifest: dict, cache_hit: bool) -> ModelArtifact:
    fields = {k: manifest[k] for k in ModelArtifact.model_fields if k in manifest and k not in ("uri", "cache_hit")}
    return ModelArtifact(uri=uri, cache_hit=cache_hit, **fields)


def work_dir(cfg: PipelineConfig, fp: str) -> str:
    """Checkpoints and history of a run in progress, on local disk (TensorFlow writes them); removed once the
    model is published. Under a local root it lives there; with a bucket root, in `artifacts.local_cache`,
    mirrored to the bucket after every epoch (see `mirror_dir`)."""
    if is_local(cfg.artifacts.root):
        return join(cfg.artifacts.root, STAGE, f".work-{fp}")
    return os.path.join(os.path.expanduser(cfg.artifacts.local_cache), STAGE, f".work-{fp}")


def mirror_dir(cfg: PipelineConfig, fp: str) -> str | None:
    """Where a bucket root keeps the work dir's copy, so that a run killed on one machine resumes on another."""
    return None if is_local(cfg.artifacts.root) else join(cfg.artifacts.root, STAGE, f".work-{fp}")


def clear_work(cfg: PipelineConfig, fp: str) -> None:
    """Remove the work dir and its bucket copy: after publishing, and before a rebuild (--rerun train)."""
    remove_tree(work_dir(cfg, fp))
    if mirror_dir(cfg, fp):
        remove_tree(mirror_dir(cfg, fp))


@dataclass
class TrainingRun:
    """What one training run works with: built once by `start_run`, handed to every step after it."""

    cfg: PipelineConfig
    dataset: DatasetArtifact
    strategy: tf.distribute.Strategy
    precision: str
    precision_reason: str
    work: str
    mirror: str | None  # the work dir's copy in the bucket, when the root is one
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    train_input: Callable[[int, int], Any]  # (epoch, batches to skip) -> that epoch's input, shuffled by seed + epoch
    val_data: Any  # a tf.data.Dataset, or under multi_worker a function each worker builds its part with
    stop: StopRequest

    @property
    def chief(self) -> bool:
        return worker_role(self.strategy)[0]

    @property
    def worker_dir(self) -> str:
        """Where this worker checkpoints: the work dir on the chief, a private one the other workers delete."""
        chief, index = worker_role(self.strategy)
        return self.work if chief else join(self.work, f".worker-{index}")

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.dataset.counts["train"], self.cfg.train.batch_size,
                               self.strategy.num_replicas_in_sync)

    def facts(self) -> dict:
        """How the run trained, for the manifest and history.json."""
        replicas = self.strategy.num_replicas_in_sync
        return {"mode": self.cfg.train.mode, "strategy": strategy_name(self.strategy),
                "devices": strategy_devices(self.strategy), "replicas": replicas,
                "global_batch_size": self.cfg.train.batch_size,
                "per_replica_batch_size": self.cfg.train.batch_size // replicas, "precision": self.precision,
                "precision_reason": self.precision_reason}


def train(cfg: PipelineConfig, dataset: DatasetArtifact, on_epoch: EpochCallback | None = None) -> ModelArtifact:
    """Train (or reuse) the model for this config and dataset; returns the published ModelArtifact.

    Under multi_worker the strategy must exist before any other TensorFlow op of the process: the worker entry
    points create it first (tasks/worker.py), and `make_strategy` here returns that one.
    """
    precision = resolve_precision(cfg.train.precision)
    fp = train_fingerprint(cfg, dataset, precision[0])
    root, uri, rebuild = cfg.artifacts.root, stage_dir(cfg.artifacts.root, STAGE, fp), cfg.rebuilds(STAGE)
    if cfg.train.local_workers:  # the workers it starts train and publish; this process reads the result
        manifest = None if rebuild else find_published(root, STAGE, fp)
        if rebuild:
            clear_work(cfg, fp)
        return model_artifact(uri, manifest or run_local_workers(cfg, fp), cache_hit=manifest is not None)

    strategy = make_strategy(cfg.train)

    def build(out: str) -> dict:
        if rebuild and not is_multi_worker(strategy):  # from scratch, not from an interrupted run's checkpoint
            clear_work(cfg, fp)
        return train_and_save(start_run(cfg, dataset, strategy, precision, fp), out, on_epoch)

    with lost_worker_errors(strategy, cfg.train.collective_timeout_s):
        published = publish_model(cfg, fp, strategy, build)
    if published.cache_hit:
        log.info("train cache hit: %s (trained %d epochs before)", uri, published.manifest["epochs"])
    elif worker_role(strategy)[0]:
        log.info("model published: %s", uri)
    return model_artifact(uri, published.manifest, published.cache_hit)


def publish_model(cfg: PipelineConfig, fp: str, strategy: tf.distribute.Strategy,
                  build: Callable[[str], dict]) -> Published:
    """The chief trains and publishes through the one reuse-or-publish path. Under multi_worker the other workers
    train too (each takes part in every collective and saves, as TensorFlow's multi-worker saving needs) into a
    private directory they delete, then wait until the chief has published."""
    chief, index = worker_role(strategy)
    root = cfg.artifacts.root
    uri = stage_dir(root, STAGE, fp)
    if chief:
        published = reuse_or_publish(root, STAGE, fp, build, rebuild=cfg.rebuilds(STAGE))
    else:
        manifest = None if cfg.rebuilds(STAGE) else find_published(root, STAGE, fp)
        published = Published(uri, manifest or {}, cache_hit=manifest is not None)
        if not published.cache_hit:
            scratch = join(work_dir(cfg, fp), f".worker-{index}")
            os.makedirs(join(scratch, "output"), exist_ok=True)
            try:
                build(join(scratch, "output"))
            finally:
                remove_tree(scratch)
    if published.cache_hit:
        return published
    if is_multi_worker(strategy):
        barrier(strategy)  # the chief has published when every worker gets past this
    if chief:
        clear_work(cfg, fp)
        return published
    manifest = find_published(root, STAGE, fp)
    if manifest is None:
        raise PipelineError(f"worker {index}: the chief did not publish {uri}: check the chief's log")
    return Published(uri, manifest, cache_hit=False)


def start_run(cfg: PipelineConfig, dataset: DatasetArtifact, strategy: tf.distribute.Strategy,
              precision: tuple[str, str], fp: str) -> TrainingRun:
    """Seeds, input pipelines, model and optimizer for one run (a bad model config fails here)."""
    tc = cfg.train
    replicas = strategy.num_replicas_in_sync
    if tc.batch_size % replicas:
        raise PipelineError(f"train.batch_size={tc.batch_size} does not split evenly over {replicas} replicas: "
                            f"use a multiple of {replicas}")
    if replicas > 1 and dataset.counts["train"] < tc.batch_size:
        raise PipelineError(f"train.batch_size={tc.batch_size} is more than the {dataset.counts['train']} training "
                            f"records, and {replicas} replicas train on whole batches only: lower train.batch_size")
    log.info("precision %s (%s); %s over %d replica(s) %s, global batch %d = %d per replica", precision[0],
             precision[1], strategy_name(strategy), replicas, strategy_devices(strategy), tc.batch_size,
             tc.batch_size // replicas)
    keras.utils.set_random_seed(tc.seed)
    if tc.deterministic:
        tf.config.experimental.enable_op_determinism()
    dataset = local_dataset(dataset, cfg.artifacts.local_cache)  # from a bucket: staged, verified shards
    train_input, val_data = training_inputs(cfg, dataset, strategy)
    model, optimizer = build_for_training(cfg, dataset, strategy, precision[0])
    return TrainingRun(cfg, dataset, strategy, precision[0], precision[1], work_dir(cfg, fp), mirror_dir(cfg, fp),
                       model, optimizer, train_input, val_data, StopRequest())


def training_inputs(cfg: PipelineConfig, dataset: DatasetArtifact,
                    strategy: tf.distribute.Strategy) -> tuple[Callable[[int, int], Any], Any]:
    """((epoch, skip) -> training input, validation input): pipelines over the whole cache, or under multi_worker
    dataset functions that give each worker its own part of it. Each epoch's shuffle is seeded by train.seed +
    epoch, so a resumed run reads epoch k in the same order as an uninterrupted one, and a run stopped in the
    middle of an epoch resumes by skipping the batches it had trained on."""
    tc = cfg.train
    multi_worker, replicas = is_multi_worker(strategy), strategy.num_replicas_in_sync
    make = per_worker_dataset_fn if multi_worker else make_dataset
    weights = class_weights(cfg, dataset)
    if weights is not None:
        log.info("class weights: %s", ", ".join(f"{i}={w:.3g}" for i, w in enumerate(weights)))
    if cfg.data.augment.flip and dataset.image_shape[-1] == 1:
        log.warning("data.augment.flip mirrors single-channel images: right for photos, wrong for digits and text")

    def train_input(epoch: int, skip: int = 0):
        # Several replicas train on whole batches only: a short last batch can leave a replica an empty one,
        # which oneDNN's convolutions on CPU fail on (less than one batch of an epoch is left out).
        data = make(dataset, "train", tc.batch_size, shuffle_buffer=cfg.data.shuffle_buffer, seed=tc.seed + epoch,
                    label_mode=LABEL_MODES[tc.loss], drop_remainder=replicas > 1, augment=cfg.data.augment,
                    class_weights=weights)
        if not skip:
            return data
        return data.skip(skip) if isinstance(data, tf.data.Dataset) else (lambda context: data(context).skip(skip))

    if multi_worker or replicas == 1:  # per_worker_dataset_fn gives every replica the same number of records
        return train_input, make(dataset, "validation", tc.batch_size, label_mode=LABEL_MODES[tc.loss])
    # The last validation batch must split evenly over the replicas: one left empty fails the convolutions, and
    # Keras' evaluation in fit fails on unequal parts (AddN of unequal shapes). Validate on a multiple of the
    # replica count (at most replicas - 1 records fewer).
    count = dataset.counts["validation"]
    return train_input, make_dataset(dataset, "validation", tc.batch_size, label_mode=LABEL_MODES[tc.loss],
                                     records=count - count % replicas)


def build_for_training(cfg: PipelineConfig, dataset: DatasetArtifact, strategy: tf.distribute.Strategy,
                       precision: str) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """Model and optimizer, both created inside the strategy scope (the optimizer built, as the custom loop needs)."""
    with strategy.scope():
        model = build_model(cfg.model, dataset.image_shape, dataset.num_classes, cfg.train.loss, precision)
        steps = steps_per_epoch(dataset.counts["train"], cfg.train.batch_size, strategy.num_replicas_in_sync)
        optimizer = make_optimizer(cfg, precision, steps)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def steps_per_epoch(records: int, batch_size: int, replicas: int) -> int:
    """Batches in one epoch: every record, or on several replicas whole batches only (see training_inputs)."""
    return batch_count(records, batch_size, drop_remainder=replicas > 1)


def train_and_save(run: TrainingRun, out: str, on_epoch: EpochCallback | None) -> dict:
    """Resume, train the remaining epochs, save the model into `out`; returns the manifest body."""
    recorder = EpochRecorder(run, on_epoch)
    start_epoch, start_step = recorder.resume()
    started = time.perf_counter()
    with run.stop:
        run_epochs(run, start_epoch, start_step, recorder)
    stopping = {}
    if recorder.early is not None:
        if run.cfg.train.early_stopping.restore_best and int(recorder.early.best_epoch.numpy()):
            recorder.early.restore()
        stopping = {"best_epoch": int(recorder.early.best_epoch.numpy()) or None,
                    "stop_reason": recorder.stop_reason or f"completed train.epochs={run.cfg.train.epochs}"}
    log.info("final weights sha256 %s (worker %d)", weights_digest(run.model), worker_role(run.strategy)[1])
    save_outputs(run, recorder, out, {"resumed_from_epoch": start_epoch,
                                      "seconds_this_run": time.perf_counter() - started, **stopping})
    history = recorder.history
    final = {k: history[-1][k] for k in history[-1] if k.split("val_")[-1] in METRIC_NAMES}
    return {**run.facts(), "dataset_fingerprint": run.dataset.fingerprint, "model_path": "model.keras",
            "saved_model_path": "saved_model", "history_path": "history.json", "tensorboard_dir": "tensorboard",
            "epochs": run.cfg.train.epochs, "resumed_from_epoch": start_epoch, "final_metrics": final,
            "image_shape": run.dataset.image_shape, "num_classes": run.dataset.num_classes,
            "label_names": run.dataset.label_names, "loss": run.cfg.train.loss,
            "config": run.cfg.model_dump(mode="json"), **stopping}


class MetricWatch:
    """The best value of a validation metric so far, the epoch it came in and the epochs since, as variables the
    checkpoint holds (a resumed run continues the count)."""

    def __init__(self, strategy: tf.distribute.Strategy, monitor: str, min_delta: float):
        self.monitor, self.min_delta = monitor, min_delta
        self.lower_is_better = monitor.endswith("loss")
        with strategy.scope():
            self.best = tf.Variable(np.inf if self.lower_is_better else -np.inf, dtype=tf.float64, trainable=False)
            self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.wait = tf.Variable(0, dtype=tf.int64, trainable=False)

    def state(self, prefix: str) -> dict:
        return {f"{prefix}_best": self.best, f"{prefix}_best_epoch": self.best_epoch, f"{prefix}_wait": self.wait}

    def update(self, epoch: int, logs: dict) -> bool:
        """Record the epoch's value; True when it is the best so far."""
        value, best = float(logs[self.monitor]), float(self.best.numpy())
        improved = value < best - self.min_delta if self.lower_is_better else value > best + self.min_delta
        if improved:
            self.best.assign(value)
            self.best_epoch.assign(epoch + 1)
            self.wait.assign(0)
        else:
            self.wait.assign_add(1)
        return improved


class EarlyStopping:
    """train.early_stopping: training stops when the monitored validation metric has not improved by `min_delta`
    for `patience` epochs, and the published model is the best epoch's weights (`restore_best`). Its state (best
    value, best epoch, epochs without improvement, the best weights) lives in the checkpoint: it survives a kill."""

    def __init__(self, run: TrainingRun):
        self.cfg, self.model = run.cfg.train.early_stopping, run.model
        self.watch = MetricWatch(run.strategy, self.cfg.monitor, self.cfg.min_delta)
        self.best_epoch = self.watch.best_epoch
        with run.strategy.scope():
            self.weights = [tf.Variable(tf.convert_to_tensor(w), trainable=False) for w in run.model.weights]

    def state(self) -> dict:
        return {**self.watch.state("es"), "es_weights": self.weights}

    def stalled(self) -> bool:
        return int(self.watch.wait.numpy()) >= self.cfg.patience

    def update(self, epoch: int, logs: dict) -> str | None:
        """Record the epoch; the reason to stop, when it is time to."""
        if self.watch.update(epoch, logs):
            for copy, weight in zip(self.weights, self.model.weights):
                copy.assign(weight)
            return None
        if not self.stalled():
            return None
        return (f"early stopping: {self.cfg.monitor} did not improve by more than {self.cfg.min_delta:g} for "
                f"{self.cfg.patience} epochs (best {float(self.watch.best.numpy()):.4f} at epoch "
                f"{int(self.best_epoch.numpy())})")

    def restore(self) -> None:
        for weight, copy in zip(self.model.weights, self.weights):
            weight.assign(copy)
        log.info("published the weights of epoch %d, the best %s", int(self.best_epoch.numpy()), self.cfg.monitor)


class Plateau:
    """train.lr_schedule plateau, as keras.callbacks.ReduceLROnPlateau: the rate is multiplied by `factor` (not
    below `min_lr`) when `monitor` has not improved for `patience` epochs. Its state and the current rate live in
    the checkpoint, and the same object drives fit and the custom loop (it sets the optimizer's rate)."""

    def __init__(self, run: TrainingRun):
        self.cfg, self.optimizer = run.cfg.train.lr_schedule, getattr(run.optimizer, "inner_optimizer", run.optimizer)
        self.watch = MetricWatch(run.strategy, self.cfg.monitor, self.cfg.min_delta)
        with run.strategy.scope():
            self.rate = tf.Variable(run.cfg.train.optimizer.learning_rate, dtype=tf.float64, trainable=False)

    def state(self) -> dict:
        return {**self.watch.state("plateau"), "plateau_rate": self.rate}

    def apply(self) -> None:
        """Give the optimizer the current rate (after a restore)."""
        self.optimizer.learning_rate = float(self.rate.numpy())

    def update(self, epoch: int, logs: dict) -> None:
        if self.watch.update(epoch, logs) or int(self.watch.wait.numpy()) < self.cfg.patience:
            return
        rate = max(float(self.rate.numpy()) * self.cfg.factor, self.cfg.min_lr)
        if rate < float(self.rate.numpy()):
            log.info("%s has not improved for %d epochs: learning rate %.3g -> %.3g", self.cfg.monitor,
                     self.cfg.patience, float(self.rate.numpy()), rate)
            self.rate.assign(rate)
            self.apply()
        self.watch.wait.assign(0)


class EpochRecorder:
    """Checkpoints and history: restores the last checkpoint, and after every epoch records it, saves a
    checkpoint and (on the chief) writes history.json and TensorBoard scalars, logs one line and calls `on_epoch`.
    `interrupt` saves a checkpoint in the middle of an epoch (a stop signal) and raises Stopped."""

    def __init__(self, run: TrainingRun, on_epoch: EpochCallback | None = None):
        self.run, self.on_epoch = run, on_epoch
        self.history: list[dict] = []
        with run.strategy.scope():
            self.completed = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
            self.steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps_into_epoch")
        # Dropout's random state is not part of the model's checkpoint graph: saved beside it, a resumed run
        # draws the same masks as an uninterrupted one.
        rng = {f"rng_{i}": v for i, v in enumerate(run.model.non_trainable_variables)
               if v.name == "seed_generator_state"}
        self.early = EarlyStopping(run) if run.cfg.train.early_stopping.enabled else None
        self.plateau = Plateau(run) if run.cfg.train.lr_schedule.name == "plateau" else None
        self.stop_reason: str | None = None
        self.checkpoint = tf.train.Checkpoint(model=run.model, optimizer=run.optimizer, completed_epochs=self.completed,
                                              steps_into_epoch=self.steps, **rng, **(self.early.state() if self.early else {}),
                                              **(self.plateau.state() if self.plateau else {}))
        os.makedirs(run.worker_dir, exist_ok=True)
        self.manager = tf.train.CheckpointManager(self.checkpoint, join(run.worker_dir, "checkpoints"), max_to_keep=2)
        self.history_path = join(run.work, "history.json")
        self.summary_writer = tf.summary.create_file_writer(join(run.worker_dir, "tensorboard"))

    def resume(self) -> tuple[int, int]:
        """Restore the chief's last checkpoint (on every worker): (epochs done, batches done of the next one)."""
        if self.run.mirror and not os.path.exists(join(self.run.work, "checkpoints", "checkpoint")):
            pull_mirror(self.run.mirror, self.run.work)  # a run killed elsewhere: its last checkpoint
        latest = tf.train.latest_checkpoint(join(self.run.work, "checkpoints"))
        if not latest:
            return 0, 0
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        done, steps = int(self.completed.numpy()), int(self.steps.numpy())
        if self.plateau is not None:
            self.plateau.apply()
        if self.early is not None and self.early.stalled():
            self.stop_reason = "early stopping: decided before the interruption"
        history = read_json(self.history_path)["epochs"] if os.path.exists(self.history_path) else []
        self.history = history[:done]
        log.info("resuming from checkpoint %s: %d of %d epochs already done%s", latest, done,
                 self.run.cfg.train.epochs, f", and {steps} batches of epoch {done + 1}" if steps else "")
        return done, steps

    def interrupt(self, epoch: int, steps: int) -> None:
        """Save a checkpoint `steps` batches into `epoch` and stop (raises Stopped)."""
        self.steps.assign(steps)
        path = self.manager.save(checkpoint_number=epoch + 1)
        self.push_mirror()
        name = signal.Signals(self.run.stop.signal).name
        raise Stopped(f"training stopped by {name} in epoch {epoch + 1}/{self.run.cfg.train.epochs} after "
                              f"{steps} batches; checkpoint saved ({path}): run the same command again to resume")

    def end_epoch(self, epoch: int, logs: dict, train_seconds: float, wall_seconds: float) -> None:
        # on several replicas an epoch trains whole batches only: less than one batch of the split is left out
        trained = min(self.run.dataset.counts["train"], self.run.steps_per_epoch * self.run.cfg.train.batch_size)
        if self.plateau is not None:  # first: the record holds the rate the next epoch trains with
            self.plateau.update(epoch, logs)
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}, "train_seconds": train_seconds,
                  "wall_seconds": wall_seconds, "images_per_second": trained / max(train_seconds, 1e-9),
                  "learning_rate": current_learning_rate(self.run.optimizer)}  # the rate the next step applies
        self.history.append(record)
        if self.early is not None:
            self.stop_reason = self.early.update(epoch, logs)
        if self.run.chief:  # before the checkpoint: history.json always covers the epochs a checkpoint says are done
            write_json_atomic(self.history_path, {"epochs": self.history})
        self.completed.assign(epoch + 1)
        self.steps.assign(0)
        self.manager.save(checkpoint_number=epoch + 1)
        if not self.run.chief:
            return
        self.push_mirror()
        with self.summary_writer.as_default(step=epoch + 1):
            for key, value in logs.items():
                tf.summary.scalar(key, value)
        self.summary_writer.flush()
        epochs = self.run.cfg.train.epochs
        log.info("epoch %d/%d: %s, %.0f images/s", epoch + 1, epochs,
                 ", ".join(f"{k}={logs[k]:.4f}" for k in sorted(logs)), record["images_per_second"])
        if self.on_epoch is not None:
            self.on_epoch({**record, "epochs": epochs})

    def push_mirror(self) -> None:
        """The chief's checkpoint and history.json to the bucket, the checkpoint index last."""
        if self.run.mirror and self.run.chief:
            push_mirror(self.run.work, self.run.mirror)

    def close(self) -> None:
        self.summary_writer.close()


def push_mirror(work: str, mirror: str) -> None:
    """Copy the work dir's checkpoints and history.json to the bucket: data files first, then history.json, then
    the `checkpoint` index that names the newest (a copy interrupted half-way still points at a whole one); then
    drop the checkpoints the manager deleted locally."""
    local = {os.path.relpath(os.path.join(d, f), work).replace(os.sep, "/")
             for d, _, names in os.walk(join(work, "checkpoints")) for f in names}
    fs_files = storage.files_under(join(mirror, "checkpoints"))
    for rel in sorted(local - {"checkpoints/checkpoint"}):
        storage.upload_file(join(work, rel), join(mirror, rel))
    if os.path.exists(join(work, "history.json")):
        storage.upload_file(join(work, "history.json"), join(mirror, "history.json"))
    storage.upload_file(join(work, "checkpoints", "checkpoint"), join(mirror, "checkpoints", "checkpoint"))
    for stale in set(fs_files) - {rel.removeprefix("checkpoints/") for rel in local}:
        storage.remove(join(mirror, "checkpoints", stale))


def pull_mirror(mirror: str, work: str) -> None:
    """The bucket's copy of a work dir into this machine's (empty) one."""
    files = storage.files_under(mirror)
    if "checkpoints/checkpoint" not in files:
        return
    for rel in files:
        storage.download(join(mirror, rel), join(work, rel))
    log.info("fetched the checkpoints of an earlier run from %s", mirror)


def save_outputs(run: TrainingRun, recorder: EpochRecorder, out: str, extra: dict) -> None:
    """model.keras, the SavedModel export, history.json and the TensorBoard logs, into `out`."""
    model = portable_copy(run.model)  # loads with plain keras.saving.load_model, custom metrics left behind
    model.save(join(out, "model.keras"))
    model.export(join(out, "saved_model"), verbose=False)
    write_json_atomic(join(out, "history.json"), {"epochs": recorder.history, **run.facts(), **extra})
    recorder.close()
    shutil.copytree(join(run.worker_dir, "tensorboard"), join(out, "tensorboard"))


def run_epochs(run: TrainingRun, start_epoch: int, start_step: int, recorder: EpochRecorder) -> None:
    """Epochs start_epoch+1 .. train.epochs in the configured style, the first from batch `start_step` on;
    `recorder.end_epoch` after each, `recorder.interrupt` when a stop signal arrives."""
    if start_epoch >= run.cfg.train.epochs or recorder.stop_reason:
        return
    if run.cfg.train.mode == "fit":
        _fit(run, start_epoch, start_step, recorder)
    else:
        _custom_loop(run, start_epoch, start_step, recorder)


class _EpochLog(keras.callbacks.Callback):
    """fit's hooks: times the training part of the epoch and hands the logs to the recorder; on a stop signal,
    ends fit after the current batch and leaves the unfinished epoch unrecorded."""

    def __init__(self, run: TrainingRun, recorder: EpochRecorder, skipped: int):
        super().__init__()
        self.run, self.recorder, self.batches = run, recorder, skipped
        self.per_epoch = run.steps_per_epoch
        self.bar = contextlib.ExitStack()

    @property
    def unfinished(self) -> bool:
        """A stop signal ended the epoch's training early."""
        return self.run.stop.signal is not None and self.batches < self.per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        self.train_seconds = None
        self.update = self.bar.enter_context(epoch_bar(self.run, epoch, self.batches))

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if on_terminal():  # reading the metrics waits for the step: only for a bar someone sees
            self.update(advance=1, info=running_metrics(logs or {}))
        if self.run.stop.signal is not None:
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        self.bar.close()
        if self.train_seconds is None:
            self.train_seconds = time.perf_counter() - self.started

    def on_epoch_end(self, epoch, logs=None):
        self.bar.close()
        if self.unfinished:
            return
        wall = time.perf_counter() - self.started
        self.recorder.end_epoch(epoch, {k: float(v) for k, v in (logs or {}).items()}, self.train_seconds or wall, wall)


@contextlib.contextmanager
def epoch_bar(run: TrainingRun, epoch: int, done: int):
    """The terminal's progress bar over one epoch's batches, `done` of them already trained (resume)."""
    with progress_bar(f"epoch {epoch + 1}/{run.cfg.train.epochs}", run.steps_per_epoch, "batches") as update:
        update(advance=done)
        yield update


def running_metrics(logs: dict) -> str:
    return "  ".join(f"{k} {float(logs[k]):.4f}" for k in ("loss", "accuracy") if k in logs)


def _fit(run: TrainingRun, start_epoch: int, start_step: int, recorder: EpochRecorder) -> None:
    """compile + fit, one epoch per fit call so that each epoch reads its own input (see training_inputs)."""
    tc = run.cfg.train
    with run.strategy.scope():
        run.model.compile(optimizer=run.optimizer, loss=make_loss(tc.loss, label_smoothing=tc.label_smoothing),
                          metrics=make_metrics(tc.loss, run.dataset.num_classes))
    for epoch in range(start_epoch, tc.epochs):
        skip = start_step if epoch == start_epoch else 0
        if run.stop.signal is not None:  # the batches a resumed epoch had trained stay done
            recorder.interrupt(epoch, skip)
        hook = _EpochLog(run, recorder, skip)
        run.model.fit(run.train_input(epoch, skip), validation_data=run.val_data, epochs=epoch + 1,
                      initial_epoch=epoch, callbacks=[hook], shuffle=False, verbose=0)  # the reader shuffles
        if hook.unfinished:
            recorder.interrupt(epoch, hook.batches)
        if recorder.stop_reason:
            log.info("%s", recorder.stop_reason)
            return


def distribute(strategy: tf.distribute.Strategy, data):
    """A tf.data.Dataset, or a per-input-pipeline dataset function (multi-worker), spread over the replicas."""
    if isinstance(data, tf.data.Dataset):
        return strategy.experimental_distribute_dataset(data)
    return strategy.distribute_datasets_from_function(data)


def weights_digest(model: keras.Model) -> str:
    """sha256 over every weight's bytes: equal digests mean bit-identical models (workers, reruns)."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    return digest.hexdigest()


class CustomSteps:
    """The seed's expert-loop pieces: a per-example loss object, Mean and accuracy metrics, and the train and
    test steps, each run on every replica through `strategy.run`."""

    def __init__(self, run: TrainingRun):
        self.run = run
        tc = run.cfg.train
        with run.strategy.scope():
            self.loss_object = make_loss(tc.loss, reduction=None, label_smoothing=tc.label_smoothing)  # per example
            self.train_loss = keras.metrics.Mean(name="train_loss")
            self.test_loss = keras.metrics.Mean(name="test_loss")
            self.train_metrics = make_metrics(tc.loss, run.dataset.num_classes)
            self.test_metrics = make_metrics(tc.loss, run.dataset.num_classes, prefix="val_")
        self.scale_loss = isinstance(run.optimizer, keras.optimizers.LossScaleOptimizer)

    def step(self, images, labels, weights=None):
        model, optimizer = self.run.model, self.run.optimizer
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            per_example = self.loss_object(labels, predictions, sample_weight=weights)  # class weights, when set
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.run.cfg.train.batch_size)
            scaled = optimizer.scale_loss(loss) if self.scale_loss else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        self.train_loss.update_state(per_example)
        for metric in self.train_metrics:
            metric.update_state(labels, predictions)  # unweighted, as fit's (see make_metrics)

    def test(self, images, labels):
        predictions = self.run.model(images, training=False)
        self.test_loss.update_state(self.loss_object(labels, predictions))
        for metric in self.test_metrics:
            metric.update_state(labels, predictions)

    @tf.function(reduce_retracing=True)  # the last, smaller batch must not trigger a retrace per epoch
    def train_step(self, *batch):  # (images, labels) or (images, labels, class weights)
        self.run.strategy.run(self.step, args=batch)

    @tf.function(reduce_retracing=True)
    def test_step(self, images, labels):
        self.run.strategy.run(self.test, args=(images, labels))

    def reset(self) -> None:
        for metric in [self.train_loss, self.test_loss, *self.train_metrics, *self.test_metrics]:
            metric.reset_state()

    def running(self) -> dict[str, float]:
        """The training loss and accuracy so far this epoch."""
        return {"loss": float(self.train_loss.result()), "accuracy": float(self.train_metrics[0].result())}

    def results(self) -> dict[str, float]:
        logs = {"loss": self.train_loss.result(), "val_loss": self.test_loss.result(),
                **{m.name: m.result() for m in self.train_metrics + self.test_metrics}}
        return {k: float(v) for k, v in logs.items()}


def _custom_loop(run: TrainingRun, start_epoch: int, start_step: int, recorder: EpochRecorder) -> None:
    """The seed's expert loop: epochs of train steps, then test steps, then the seed's epoch line."""
    steps = CustomSteps(run)
    for epoch in range(start_epoch, run.cfg.train.epochs):
        steps.reset()
        started = time.perf_counter()
        done = start_step if epoch == start_epoch else 0
        with epoch_bar(run, epoch, done) as update:
            for batch in distribute(run.strategy, run.train_input(epoch, done)):
                if run.stop.signal is not None:
                    recorder.interrupt(epoch, done)
                steps.train_step(*batch)
                done += 1
                if on_terminal() and done % 10 == 0:  # reading the metrics waits for the step: not every batch
                    update(advance=10, info=running_metrics(steps.running()))
        train_seconds = time.perf_counter() - started
        for images, labels in distribute(run.strategy, run.val_data):
            steps.test_step(images, labels)
        logs = steps.results()
        print(f"Epoch {epoch + 1}, Loss: {logs['loss']}, Accuracy: {logs['accuracy'] * 100}, "
              f"Test Loss {logs['val_loss']}, Test Accuracy: {logs['val_accuracy'] * 100}", flush=True)
        recorder.end_epoch(epoch, logs, train_seconds, time.perf_counter() - started)
        if recorder.stop_reason:
            log.info("%s", recorder.stop_reason)
            return
