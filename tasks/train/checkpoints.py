"""Checkpoints and the record of epochs: where a run in progress keeps its checkpoints (the work dir, mirrored to
a bucket root), the EpochRecorder that restores and saves them and writes history.json, and the finished
model's files."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from typing import Callable

import tensorflow as tf

from pipeline_config import PipelineConfig
from tasks.errors import Stopped
from tasks.model.published import portable_copy
from tasks.store import storage
from tasks.store.publish import MODEL_FILE, remove_tree
from tasks.store.storage import join
from tasks.train.optimization import current_learning_rate
from tasks.train.run import TrainingRun
from tasks.train.watches import EarlyStopping, Plateau

log = logging.getLogger("tfpipe.train")
STAGE = "train"
EpochCallback = Callable[[dict], None]


def work_dir(cfg: PipelineConfig, fp: str) -> str:
    """Checkpoints and history of a run in progress, on local disk (TensorFlow writes them); removed once the
    model is published. Under a local root it lives there; with a bucket root, in `artifacts.local_cache`,
    mirrored to the bucket after every epoch (see `mirror_dir`)."""
    if storage.is_local(cfg.artifacts.root):
        return join(cfg.artifacts.root, STAGE, f".work-{fp}")
    return os.path.join(os.path.expanduser(cfg.artifacts.local_cache), STAGE, f".work-{fp}")


def mirror_dir(cfg: PipelineConfig, fp: str) -> str | None:
    """Where a bucket root keeps the work dir's copy, so that a run killed on one machine resumes on another."""
    return None if storage.is_local(cfg.artifacts.root) else join(cfg.artifacts.root, STAGE, f".work-{fp}")


def clear_work(cfg: PipelineConfig, fp: str) -> None:
    """Remove the work dir and its bucket copy: after publishing, and before a rebuild (--rerun train)."""
    remove_tree(work_dir(cfg, fp))
    if mirror_dir(cfg, fp):
        remove_tree(mirror_dir(cfg, fp))


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
        # phase 1's optimizer under the name a run without phases uses; the others beside it
        optimizers = {"optimizer": run.optimizers[0],
                      **{f"optimizer_phase_{i + 1}": o for i, o in enumerate(run.optimizers) if i}}
        self.checkpoint = tf.train.Checkpoint(model=run.model, **optimizers, completed_epochs=self.completed,
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
        history = storage.read_json(self.history_path)["epochs"] if os.path.exists(self.history_path) else []
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
        record = {"epoch": epoch + 1, **({"phase": self.run.phase + 1} if self.run.cfg.train.phases else {}),
                  **{k: float(v) for k, v in logs.items()}, "train_seconds": train_seconds,
                  "wall_seconds": wall_seconds, "images_per_second": trained / max(train_seconds, 1e-9),
                  "learning_rate": current_learning_rate(self.run.optimizer)}  # the rate the next step applies
        self.history.append(record)
        if self.early is not None:
            self.stop_reason = self.early.update(epoch, logs)
        if self.run.chief:  # before the checkpoint: history.json always covers the epochs a checkpoint says are done
            storage.write_json(self.history_path, {"epochs": self.history})
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

    def finish(self) -> dict:
        """After the last epoch: the best epoch's weights put back (early stopping with restore_best); the
        best epoch and the stop reason for the manifest (empty without early stopping)."""
        if self.early is None:
            return {}
        if self.run.cfg.train.early_stopping.restore_best and int(self.early.best_epoch.numpy()):
            self.early.restore()
        return self.early.summary(self.stop_reason, self.run.cfg.train.epochs)

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


def save_outputs(run: TrainingRun, recorder: EpochRecorder, out: str, extra: dict):
    """model.keras, history.json and the TensorBoard logs, into `out`; returns the model as saved (the serving
    formats are made from it: tasks/serve/export.py)."""
    model = portable_copy(run.model)  # loads with plain keras.saving.load_model, custom metrics left behind
    model.save(join(out, MODEL_FILE))
    storage.write_json(join(out, "history.json"), {"epochs": recorder.history, **run.facts(), **extra})
    recorder.close()
    shutil.copytree(join(run.worker_dir, "tensorboard"), join(out, "tensorboard"))
    return model
