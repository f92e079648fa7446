"""What one training run works with: the TrainingRun that `start_run` (setup.py) builds and every later step is
handed, and the stop request it carries."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable

import keras
import tensorflow as tf

from pipeline_config import PipelineConfig
from tasks.data.reader import batch_count
from tasks.distributed.cluster import worker_role
from tasks.distributed.devices import strategy_devices, strategy_name
from tasks.store.refs import DatasetArtifact
from tasks.store.storage import join
from tasks.train.phases import describe, set_trainable

log = logging.getLogger("tfpipe.train")


class StopRequest:
    """SIGTERM (what Kubernetes, `prefect flow-run cancel` and `kill` send) asks training to stop before the next
    batch, save a checkpoint and exit. Installed while training runs, in the main thread only (where Python
    delivers signals). A worker of a multi_worker cluster does not catch it (`catch=False`): the workers must
    stop at the same step, so a stopped worker makes the others fail within the collective timeout, and the
    relaunched cluster resumes from the last epoch."""

    def __init__(self, catch: bool = True) -> None:
        self.signal: int | None = None
        self.catch, self.previous = catch, None

    def __enter__(self) -> "StopRequest":
        if self.catch and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        log.warning("%s received: stopping before the next batch, after saving a checkpoint",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


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
    optimizers: list[keras.optimizers.Optimizer]  # one per phase (train.phases), each built on its trainable set
    train_input: Callable[[int, int], Any]  # (epoch, batches to skip) -> that epoch's input, shuffled by seed + epoch
    val_data: Any  # a tf.data.Dataset, or under multi_worker a function each worker builds its part with
    stop: StopRequest
    init_from: dict | None = None  # the published model the weights started from: fingerprint, uri
    phase: int = 0

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        """The optimizer of the phase being trained."""
        return self.optimizers[self.phase]

    def enter_phase(self, index: int) -> None:
        """Freeze and unfreeze for phase `index`; its optimizer steps from now on."""
        if self.cfg.train.phases:
            set_trainable(self.model, self.cfg.train.phases[index].trainable)
            log.info("%s", describe(self.cfg.train, index, self.model))
        self.phase = index

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


def steps_per_epoch(records: int, batch_size: int, replicas: int) -> int:
    """Batches in one epoch: every record, or on several replicas whole batches only (see training_inputs)."""
    return batch_count(records, batch_size, drop_remainder=replicas > 1)
