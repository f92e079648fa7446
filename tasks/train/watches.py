"""Watches over a validation metric between epochs: early stopping and the plateau schedule. Their state lives in
tf.Variables that the checkpoint holds, so a resumed run decides as an uninterrupted one would."""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from tasks.train.run import TrainingRun

log = logging.getLogger("tfpipe.train")


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

    def summary(self, reason: str | None, epochs: int) -> dict:
        """The best epoch and why training stopped, for the manifest and history.json."""
        return {"best_epoch": int(self.best_epoch.numpy()) or None,
                "stop_reason": reason or f"completed train.epochs={epochs}"}


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
