"""The two training styles side by side, one convention for both: `fit` (compile + fit, one call per epoch) and
the seed's custom GradientTape loop run through `strategy.run`. Each counts an epoch's batches with
EpochBatches: the stop check before every batch (a stop signal saves a checkpoint with the batches done), the
progress bar, a debug line every tenth of the epoch; each ends an epoch with `EpochRecorder.end_epoch`, which
writes the epoch's log line."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from typing import Callable

import keras
import tensorflow as tf

from tasks.progress import on_terminal, progress_bar
from tasks.train.checkpoints import EpochRecorder
from tasks.train.objectives import make_loss, make_metrics
from tasks.train.phases import phase_at
from tasks.train.run import TrainingRun

log = logging.getLogger("tfpipe.train")


def run_epochs(run: TrainingRun, start_epoch: int, start_step: int, recorder: EpochRecorder) -> None:
    """Epochs start_epoch+1 .. train.epochs in the configured style, the first from batch `start_step` on;
    `recorder.end_epoch` after each, `recorder.interrupt` when a stop signal arrives."""
    if start_epoch >= run.cfg.train.epochs or recorder.stop_reason:
        return
    style = None
    for epoch in range(start_epoch, run.cfg.train.epochs):
        phase = phase_at(run.cfg.train, epoch)
        if style is None or phase != run.phase:  # a new trainable set: compiled (fit) or traced (custom) anew
            run.enter_phase(phase)
            style = FitStyle(run, recorder) if run.cfg.train.mode == "fit" else CustomStyle(run, recorder)
        style.train_epoch(epoch, start_step if epoch == start_epoch else 0)
        if recorder.stop_reason:
            log.info("%s", recorder.stop_reason)
            return


class EpochBatches:
    """One epoch's batches as both styles count them: `done` starts at the batches a resumed epoch had trained;
    before each batch a stop signal saves a checkpoint `done` batches in (`recorder.interrupt`); after each, the
    terminal's progress bar moves (every 10 batches: reading the metrics waits for the step) and a debug line
    (`-v`) marks every tenth of the epoch."""

    def __init__(self, run: TrainingRun, recorder: EpochRecorder, epoch: int, done: int):
        self.run, self.recorder, self.epoch, self.done = run, recorder, epoch, done
        self.total = run.steps_per_epoch
        self.every = max(1, self.total // 10)
        self.started = time.perf_counter()
        self.train_seconds: float | None = None
        self.bar = contextlib.ExitStack()
        name = f"epoch {epoch + 1}/{run.cfg.train.epochs}"
        self.update = self.bar.enter_context(progress_bar(name, self.total, "batches"))
        self.update(advance=done)

    def before_batch(self) -> None:
        if self.run.stop.signal is not None:
            self.bar.close()
            self.recorder.interrupt(self.epoch, self.done)

    def after_batch(self, running: Callable[[], dict]) -> None:
        self.done += 1
        if self.done % 10 == 0 and on_terminal():
            self.update(advance=10, info="  ".join(f"{k} {float(v):.4f}" for k, v in running().items()))
        if self.done % self.every == 0:
            log.debug("epoch %d/%d: %d of %d batches trained", self.epoch + 1, self.run.cfg.train.epochs, self.done,
                      self.total)

    def end_training(self) -> float:
        """The seconds the epoch's training part took (validation comes after it)."""
        if self.train_seconds is None:
            self.bar.close()
            self.train_seconds = time.perf_counter() - self.started
        return self.train_seconds

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started


# ------------------------------------------------------------------------------------------------ fit

class FitHooks(keras.callbacks.Callback):
    """fit's side of EpochBatches: the stop check before each batch, counting after it, the epoch's record."""

    def __init__(self, run: TrainingRun, recorder: EpochRecorder, epoch: int, skipped: int):
        super().__init__()
        self.run, self.recorder, self.epoch, self.skipped = run, recorder, epoch, skipped
        self.batches: EpochBatches | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.batches = EpochBatches(self.run, self.recorder, self.epoch, self.skipped)

    def on_train_batch_begin(self, batch, logs=None):
        self.batches.before_batch()

    def on_train_batch_end(self, batch, logs=None):
        self.batches.after_batch(lambda: {k: logs[k] for k in ("loss", "accuracy") if k in (logs or {})})

    def on_test_begin(self, logs=None):
        self.batches.end_training()

    def on_epoch_end(self, epoch, logs=None):
        train_seconds = self.batches.end_training()
        self.recorder.end_epoch(self.epoch, {k: float(v) for k, v in (logs or {}).items()}, train_seconds,
                                self.batches.wall_seconds())


class FitStyle:
    """compile + fit, one fit call per epoch, so that each epoch reads its own input (see training_inputs)."""

    def __init__(self, run: TrainingRun, recorder: EpochRecorder):
        self.run, self.recorder = run, recorder
        tc = run.cfg.train
        with run.strategy.scope():
            run.model.compile(optimizer=run.optimizer, loss=make_loss(tc.loss, label_smoothing=tc.label_smoothing),
                              metrics=make_metrics(tc.loss, run.dataset.num_classes))

    def train_epoch(self, epoch: int, skip: int) -> None:
        hooks = FitHooks(self.run, self.recorder, epoch, skip)
        self.run.model.fit(self.run.train_input(epoch, skip), validation_data=self.run.val_data, epochs=epoch + 1,
                           initial_epoch=epoch, callbacks=[hooks], shuffle=False, verbose=0)  # the reader shuffles


# ------------------------------------------------------------------------------------------------ custom

def distribute(strategy: tf.distribute.Strategy, data):
    """A tf.data.Dataset, or a per-input-pipeline dataset function (multi-worker), spread over the replicas."""
    if isinstance(data, tf.data.Dataset):
        return strategy.experimental_distribute_dataset(data)
    return strategy.distribute_datasets_from_function(data)


class CustomStyle:
    """The seed's expert loop: a per-example loss object, Mean and accuracy metrics, and the train and test
    steps, each run on every replica through `strategy.run`; an epoch is train steps, then test steps."""

    def __init__(self, run: TrainingRun, recorder: EpochRecorder):
        self.run, self.recorder = run, recorder
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

    def train_epoch(self, epoch: int, skip: int) -> None:
        run = self.run
        self.reset()
        batches = EpochBatches(run, self.recorder, epoch, skip)
        for batch in distribute(run.strategy, run.train_input(epoch, skip)):
            batches.before_batch()
            self.train_step(*batch)
            batches.after_batch(self.running)
        train_seconds = batches.end_training()
        for images, labels in distribute(run.strategy, run.val_data):
            self.test_step(images, labels)
        self.recorder.end_epoch(epoch, self.results(), train_seconds, batches.wall_seconds())


def weights_digest(model: keras.Model) -> str:
    """sha256 over every weight's bytes: equal digests mean bit-identical models (workers, reruns)."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    return digest.hexdigest()
