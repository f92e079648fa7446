"""Stage 3, train: fit the model on the TFRecord cache under a distribution strategy, resumably.

Two styles, as in the seed: `fit` (compile + fit) and `custom` (the expert GradientTape loop run through
`strategy.run`). Both checkpoint at the end of every epoch in `<root>/train/.work-<fingerprint>/`; an
interrupted run with the same fingerprint resumes from the last completed epoch with its optimizer state.
The finished model is published to `<root>/train/<fingerprint>/`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from typing import Callable

import keras
import tensorflow as tf

from pipeline_config import PipelineConfig, fingerprint
from tasks.artifacts import (DatasetArtifact, ModelArtifact, find_published, join, publish, read_json, remove_tree,
                             write_json_atomic)
from tasks.devices import (barrier, is_multi_worker, make_strategy, resolve_precision, strategy_devices, strategy_name,
                           worker_role)
from tasks.errors import PipelineError
from tasks.model import build_model
from tasks.reader import make_dataset, per_worker_dataset_fn

log = logging.getLogger("tfpipe.train")

TRAIN_CODE_VERSION = "1"
STAGE = "train"
LABEL_MODES = {"sparse_categorical_crossentropy": "sparse", "categorical_crossentropy": "categorical",
               "binary_crossentropy": "binary"}
METRIC_NAMES = ("loss", "accuracy", "precision", "recall")

EpochCallback = Callable[[dict], None]


@keras.saving.register_keras_serializable(package="tfpipe")
class MacroPrecisionRecall(keras.metrics.Metric):
    """Macro-averaged precision or recall over classes, from a confusion matrix accumulated over batches.

    Works for integer labels, one-hot labels and a single sigmoid unit (two classes).
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
        self.matrix.assign_add(tf.math.confusion_matrix(truth, guess, self.num_classes, dtype=self.matrix.dtype))

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


def make_loss(name: str, reduction: str | None = "sum_over_batch_size") -> keras.losses.Loss:
    return {
        "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
        "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
        "binary_crossentropy": keras.losses.BinaryCrossentropy,
    }[name](reduction=reduction)


def make_accuracy(loss: str, name: str = "accuracy") -> keras.metrics.Metric:
    return {
        "sparse_categorical_crossentropy": keras.metrics.SparseCategoricalAccuracy,
        "categorical_crossentropy": keras.metrics.CategoricalAccuracy,
        "binary_crossentropy": keras.metrics.BinaryAccuracy,
    }[loss](name=name)


def make_metrics(loss: str, num_classes: int, prefix: str = "") -> list[keras.metrics.Metric]:
    mode = LABEL_MODES[loss]
    classes = 2 if mode == "binary" else num_classes
    return [make_accuracy(loss, f"{prefix}accuracy"),
            MacroPrecisionRecall(classes, "precision", mode, name=f"{prefix}precision"),
            MacroPrecisionRecall(classes, "recall", mode, name=f"{prefix}recall")]


def make_optimizer(cfg: PipelineConfig, precision: str) -> keras.optimizers.Optimizer:
    opt = cfg.train.optimizer
    if opt.name == "sgd":
        optimizer = keras.optimizers.SGD(opt.learning_rate, momentum=opt.momentum)
    elif opt.name == "rmsprop":
        optimizer = keras.optimizers.RMSprop(opt.learning_rate)
    else:
        optimizer = keras.optimizers.Adam(opt.learning_rate)
    if precision == "mixed_float16":  # fp16 gradients underflow without loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def train_fingerprint(cfg: PipelineConfig, dataset: DatasetArtifact, precision: str) -> str:
    train = cfg.train.model_dump(mode="json")
    train["precision"] = precision  # `auto` resolves per machine: key on what actually trains
    if train["local_workers"]:  # the launcher and the workers it starts name the same model
        train.update(strategy="multi_worker", local_workers=None)
    return fingerprint({"dataset": dataset.fingerprint, "model": cfg.model.model_dump(mode="json"), "train": train,
                        "shuffle_buffer": cfg.data.shuffle_buffer, "code": TRAIN_CODE_VERSION})


def load_model(path: str) -> keras.Model:
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def model_artifact(uri: str, manifest: dict, cache_hit: bool) -> ModelArtifact:
    fields = {k: manifest[k] for k in ModelArtifact.model_fields if k in manifest and k not in ("uri", "cache_hit")}
    return ModelArtifact(uri=uri, cache_hit=cache_hit, **fields)


class _EpochLog(keras.callbacks.Callback):
    """fit's per-epoch hook: times the training part of the epoch and hands the logs to `end_epoch`."""

    def __init__(self, end_epoch):
        super().__init__()
        self.end_epoch = end_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        self.train_seconds = None

    def on_test_begin(self, logs=None):
        if self.train_seconds is None:
            self.train_seconds = time.perf_counter() - self.started

    def on_epoch_end(self, epoch, logs=None):
        wall = time.perf_counter() - self.started
        self.end_epoch(epoch, {k: float(v) for k, v in (logs or {}).items()}, self.train_seconds or wall, wall)


def train(cfg: PipelineConfig, dataset: DatasetArtifact, on_epoch: EpochCallback | None = None,
          strategy: tf.distribute.Strategy | None = None) -> ModelArtifact:
    """Train (or reuse) the model for this config and dataset; returns the published ModelArtifact.

    `strategy` is passed in by the multi-worker entry point, which must create it before any other TF op.
    """
    precision, precision_reason = resolve_precision(cfg.train.precision)
    fp = train_fingerprint(cfg, dataset, precision)
    root = cfg.artifacts.root
    uri = join(root, STAGE, fp)
    manifest = find_published(root, STAGE, fp)
    if manifest is not None:
        log.info("train cache hit: %s (trained %d epochs before)", uri, manifest["epochs"])
        return model_artifact(uri, manifest, cache_hit=True)

    tc = cfg.train
    if tc.local_workers and strategy is None:
        from tasks.cluster import run_local_workers

        return run_local_workers(cfg)
    strategy = strategy or make_strategy(tc)
    chief, worker_index = worker_role(strategy)
    replicas = strategy.num_replicas_in_sync
    if tc.batch_size % replicas:
        raise PipelineError(f"train.batch_size={tc.batch_size} does not split evenly over {replicas} replicas: "
                            f"use a multiple of {replicas}")
    per_replica = tc.batch_size // replicas
    devices = strategy_devices(strategy)
    log.info("precision %s (%s); %s over %d replica(s) %s, global batch %d = %d per replica", precision,
             precision_reason, strategy_name(strategy), replicas, devices, tc.batch_size, per_replica)
    keras.utils.set_random_seed(tc.seed)
    if tc.deterministic:
        tf.config.experimental.enable_op_determinism()

    label_mode = LABEL_MODES[tc.loss]
    if is_multi_worker(strategy):  # each worker reads its own part of the cache
        train_ds = per_worker_dataset_fn(dataset, "train", tc.batch_size, shuffle_buffer=cfg.data.shuffle_buffer,
                                         seed=tc.seed, label_mode=label_mode)
        val_ds = per_worker_dataset_fn(dataset, "validation", tc.batch_size, label_mode=label_mode)
    else:
        train_ds = make_dataset(dataset, "train", tc.batch_size, shuffle_buffer=cfg.data.shuffle_buffer, seed=tc.seed,
                                label_mode=label_mode)
        val_ds = make_dataset(dataset, "validation", tc.batch_size, label_mode=label_mode)

    work = join(root, STAGE, f".work-{fp}")
    model, optimizer = build_for_training(cfg, dataset, strategy, precision)  # a bad model config fails here
    tf.io.gfile.makedirs(work)
    with strategy.scope():
        completed = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, completed_epochs=completed)
    # Every worker saves (TF's multi-worker checkpointing needs all of them); only the chief's copy is kept.
    own = work if chief else join(work, f".worker-{worker_index}")
    manager = tf.train.CheckpointManager(checkpoint, join(own, "checkpoints"), max_to_keep=2)
    history_path = join(work, "history.json")
    history: list[dict] = []
    latest = tf.train.latest_checkpoint(join(work, "checkpoints"))  # the chief's, on every worker
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        history = read_json(history_path)["epochs"] if tf.io.gfile.exists(history_path) else []
        history = history[: int(completed.numpy())]
        log.info("resuming from checkpoint %s: %d of %d epochs already done", latest, int(completed.numpy()), tc.epochs)
    start_epoch = int(completed.numpy())
    summary_writer = tf.summary.create_file_writer(join(own, "tensorboard"))
    train_count = dataset.counts["train"]

    def end_epoch(epoch: int, logs: dict, train_seconds: float, wall_seconds: float) -> None:
        record = {"epoch": epoch + 1, **{k: float(logs[k]) for k in logs},
                  "train_seconds": train_seconds, "wall_seconds": wall_seconds,
                  "images_per_second": train_count / max(train_seconds, 1e-9)}
        history.append(record)
        completed.assign(epoch + 1)
        manager.save(checkpoint_number=epoch + 1)
        if not chief:
            return
        write_json_atomic(history_path, {"epochs": history})
        with summary_writer.as_default(step=epoch + 1):
            for key, value in logs.items():
                tf.summary.scalar(key, value)
        summary_writer.flush()
        log.info("epoch %d/%d: %s, %.0f images/s", epoch + 1, tc.epochs,
                 ", ".join(f"{k}={logs[k]:.4f}" for k in sorted(logs)), record["images_per_second"])
        if on_epoch is not None:
            on_epoch({**record, "epochs": tc.epochs})

    started = time.perf_counter()
    run_epochs(model, optimizer, strategy, cfg, dataset, train_ds, val_ds, start_epoch, end_epoch)
    seconds = time.perf_counter() - started

    final = {k: history[-1][k] for k in history[-1] if k.split("val_")[-1] in METRIC_NAMES}
    body = {
        "dataset_fingerprint": dataset.fingerprint, "model_path": "model.keras", "saved_model_path": "saved_model",
        "history_path": "history.json", "tensorboard_dir": "tensorboard", "mode": tc.mode,
        "strategy": strategy_name(strategy), "devices": devices, "replicas": replicas,
        "global_batch_size": tc.batch_size, "per_replica_batch_size": per_replica, "precision": precision,
        "precision_reason": precision_reason, "epochs": tc.epochs, "resumed_from_epoch": start_epoch,
        "final_metrics": final, "image_shape": dataset.image_shape, "num_classes": dataset.num_classes,
        "label_names": dataset.label_names, "loss": tc.loss, "config": cfg.model_dump(mode="json"),
    }

    def write(tmp: str) -> dict:
        model.save(join(tmp, "model.keras"))
        model.export(join(tmp, "saved_model"), verbose=False)
        write_json_atomic(join(tmp, "history.json"), {
            "epochs": history, "precision": precision, "precision_reason": precision_reason, "mode": tc.mode,
            "replicas": replicas, "devices": devices, "global_batch_size": tc.batch_size,
            "per_replica_batch_size": per_replica, "resumed_from_epoch": start_epoch, "seconds_this_run": seconds})
        summary_writer.close()
        shutil.copytree(join(work, "tensorboard"), join(tmp, "tensorboard"))
        return body

    log.info("final weights sha256 %s (worker %d)", weights_digest(model), worker_index)
    if chief:
        manifest = publish(root, STAGE, fp, write)
    else:  # the documented multi-worker pattern: non-chief workers save too, to a temporary place, then drop it
        summary_writer.close()
        model.save(join(own, "model.keras"))
        remove_tree(own)
    if is_multi_worker(strategy):
        barrier(strategy)  # the chief has published when every worker gets past this
        manifest = find_published(root, STAGE, fp)
        if manifest is None:
            raise PipelineError(f"worker {worker_index}: the chief did not publish {uri}: check the chief's log")
    if chief:
        remove_tree(work)
        log.info("model published: %s", uri)
    return model_artifact(uri, manifest, cache_hit=False)


def build_for_training(cfg: PipelineConfig, dataset: DatasetArtifact, strategy: tf.distribute.Strategy,
                       precision: str) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """Model and optimizer, both created inside the strategy scope (the optimizer built, as the custom loop needs)."""
    with strategy.scope():
        model = build_model(cfg.model, dataset.image_shape, dataset.num_classes, cfg.train.loss, precision)
        optimizer = make_optimizer(cfg, precision)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def run_epochs(model, optimizer, strategy, cfg, dataset, train_ds, val_ds, start_epoch, end_epoch) -> None:
    """Epochs start_epoch+1 .. train.epochs in the configured style; `end_epoch` is called after each."""
    if start_epoch >= cfg.train.epochs:
        return
    if cfg.train.mode == "fit":
        _fit(model, optimizer, strategy, cfg, dataset, train_ds, val_ds, start_epoch, end_epoch)
    else:
        _custom_loop(model, optimizer, strategy, cfg, dataset, train_ds, val_ds, start_epoch, end_epoch)


def _fit(model, optimizer, strategy, cfg, dataset, train_ds, val_ds, start_epoch, end_epoch) -> None:
    tc = cfg.train
    with strategy.scope():
        model.compile(optimizer=optimizer, loss=make_loss(tc.loss), metrics=make_metrics(tc.loss, dataset.num_classes))
    model.fit(train_ds, validation_data=val_ds, epochs=tc.epochs, initial_epoch=start_epoch,
              callbacks=[_EpochLog(end_epoch)], shuffle=False, verbose=0)  # the reader shuffles


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


def _custom_loop(model, optimizer, strategy, cfg, dataset, train_ds, val_ds, start_epoch, end_epoch) -> None:
    """The seed's expert loop: loss object, Mean/accuracy metrics, @tf.function steps, run per replica."""
    tc = cfg.train
    with strategy.scope():
        loss_object = make_loss(tc.loss, reduction=None)  # per-example: averaged over the global batch below
        train_loss = keras.metrics.Mean(name="train_loss")
        test_loss = keras.metrics.Mean(name="test_loss")
        train_metrics = make_metrics(tc.loss, dataset.num_classes)
        test_metrics = make_metrics(tc.loss, dataset.num_classes, prefix="val_")
    scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def step(images, labels):
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            per_example = loss_object(labels, predictions)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=tc.batch_size)
            scaled = optimizer.scale_loss(loss) if scale_loss else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        train_loss.update_state(per_example)
        for metric in train_metrics:
            metric.update_state(labels, predictions)

    def test(images, labels):
        predictions = model(images, training=False)
        test_loss.update_state(loss_object(labels, predictions))
        for metric in test_metrics:
            metric.update_state(labels, predictions)

    @tf.function(reduce_retracing=True)  # the last, smaller batch must not trigger a retrace per epoch
    def train_step(images, labels):
        strategy.run(step, args=(images, labels))

    @tf.function(reduce_retracing=True)
    def test_step(images, labels):
        strategy.run(test, args=(images, labels))

    all_metrics = [train_loss, test_loss, *train_metrics, *test_metrics]
    for epoch in range(start_epoch, tc.epochs):
        for metric in all_metrics:
            metric.reset_state()
        started = time.perf_counter()
        for images, labels in distribute(strategy, train_ds):
            train_step(images, labels)
        train_seconds = time.perf_counter() - started
        for images, labels in distribute(strategy, val_ds):
            test_step(images, labels)
        logs = {"loss": train_loss.result(), "val_loss": test_loss.result(),
                **{m.name: m.result() for m in train_metrics + test_metrics}}
        logs = {k: float(v) for k, v in logs.items()}
        print(f"Epoch {epoch + 1}, Loss: {logs['loss']}, Accuracy: {logs['accuracy'] * 100}, "
              f"Test Loss {logs['val_loss']}, Test Accuracy: {logs['val_accuracy'] * 100}", flush=True)
        end_epoch(epoch, logs, train_seconds, time.perf_counter() - started)
