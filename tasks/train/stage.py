"""The train stage: train (or reuse) the model for a config and dataset, and publish it through the one
reuse-or-publish path; under multi_worker, every worker trains and the chief publishes."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import tensorflow as tf

from pipeline_config import PipelineConfig, fingerprint
from tasks.distributed.cluster import barrier, lost_worker_errors, run_local_workers, worker_role
from tasks.distributed.devices import make_strategy
from tasks.errors import PipelineError, Stopped, first_line
from tasks.model.backbones import weights_fingerprint
from tasks.model.precision import resolve_precision
from tasks.model.published import RAW_PIXELS
from tasks.serve.export import export_formats, export_published, missing_formats
from tasks.store.publish import MODEL_FILE, Published, find_published, remove_tree, reuse_or_publish, stage_dir
from tasks.store.refs import DatasetArtifact, ModelArtifact, model_artifact
from tasks.store.storage import join
from tasks.train.batch_norm import recalibrate_batch_norm, uses_batch_norm
from tasks.train.checkpoints import STAGE, EpochCallback, EpochRecorder, clear_work, save_outputs, work_dir
from tasks.train.loops import run_epochs, weights_digest
from tasks.train.objectives import METRIC_NAMES
from tasks.train.run import TrainingRun
from tasks.train.setup import init_source, start_run
from tasks.tracking import Tracker

log = logging.getLogger("tfpipe.train")

TRAIN_CODE_VERSION = "6"  # 2: epoch k shuffled by train.seed + k (exact resume); 3: per-worker augmentation streams;
# 4: whole batches only on several replicas; 5: every initializer and dropout seeded from train.seed; 6: the model
# takes uint8 pixels and scales them itself


def train_fingerprint(cfg: PipelineConfig, dataset: DatasetArtifact, precision: str) -> str:
    # keys that change nothing here left out: the fingerprints of before stay
    unset = {key for key in ("phases", "init_from") if not getattr(cfg.train, key)}
    if not uses_batch_norm(cfg.model):
        unset.add("bn_recalibration_batches")
    train = cfg.train.model_dump(mode="json", exclude=unset)
    train["precision"] = precision  # `auto` resolves per machine: key on what actually trains
    if train["local_workers"]:  # the launcher and the workers it starts name the same model
        train.update(strategy="multi_worker", local_workers=None)
    # model.card changes no weight; a backbone replaces model.layers
    model = cfg.model.model_dump(mode="json", exclude={"card", "layers" if cfg.model.backbone else "backbone"})
    starts = {"backbone_weights": weights_fingerprint(cfg.model.backbone)} if cfg.model.backbone else {}
    if cfg.train.init_from:
        starts["init_from"] = init_source(cfg)[0]  # `champion` keys on the model it names now
    return fingerprint({"dataset": dataset.fingerprint, "model": model, "train": train, **starts,
                        "shuffle_buffer": cfg.data.shuffle_buffer, "augment": cfg.data.augment.model_dump(mode="json"),
                        "code": TRAIN_CODE_VERSION})


def train(cfg: PipelineConfig, dataset: DatasetArtifact, on_epoch: EpochCallback | None = None) -> ModelArtifact:
    """Train (or reuse) the model for this config and dataset; returns the published ModelArtifact.

    Under multi_worker the strategy must exist before any other TensorFlow op of the process: the worker entry
    points create it first (worker.py), and `make_strategy` here returns that one.
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
        if rebuild and not cfg.train.in_cluster:  # from scratch, not from an interrupted run's checkpoint
            clear_work(cfg, fp)
        tracker = Tracker(cfg, enabled=worker_role(strategy)[0])
        tracker.start(fp, dataset.fingerprint)
        try:
            manifest = train_and_save(start_run(cfg, dataset, strategy, precision, fp), out, tracked(on_epoch, tracker))
        except BaseException as exc:  # stopped (a signal, a pruner) or failed: the tracker says which, and why
            stopped = isinstance(exc, (Stopped, KeyboardInterrupt)) or type(exc).__name__ == "TrialPruned"
            tracker.end("KILLED" if stopped else "FAILED", first_line(exc))
            raise
        tracker.end()
        return manifest

    with lost_worker_errors(cfg.train):
        published = publish_model(cfg, fp, strategy, build)
    manifest = published.manifest
    if published.cache_hit:
        log.info("train cache hit: %s (trained %d epochs before)", uri, manifest["epochs"])
        if missing_formats(cfg.export, manifest) and worker_role(strategy)[0]:  # export.formats grew since
            manifest = export_published(cfg, uri, missing_formats(cfg.export, manifest))
    elif worker_role(strategy)[0]:
        log.info("model published: %s", uri)
    return model_artifact(uri, manifest, published.cache_hit)


def tracked(on_epoch: EpochCallback | None, tracker: Tracker) -> EpochCallback:
    """The epoch hook with the tracker first: the epoch that makes a pruner stop the run is logged too."""
    def hook(record: dict) -> None:
        tracker.epoch(record)
        if on_epoch is not None:
            on_epoch(record)
    return hook


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
    if cfg.train.in_cluster:
        barrier(strategy, cfg.train.worker_wait_s)  # the chief has published when every worker gets past this
    if chief:
        clear_work(cfg, fp)
        return published
    manifest = find_published(root, STAGE, fp)
    if manifest is None:
        raise PipelineError(f"worker {index}: the chief did not publish {uri}: check the chief's log")
    return Published(uri, manifest, cache_hit=False)


def train_and_save(run: TrainingRun, out: str, on_epoch: EpochCallback | None) -> dict:
    """Resume, train the remaining epochs, save the model into `out`; returns the manifest body."""
    recorder = EpochRecorder(run, on_epoch)
    start_epoch, start_step = recorder.resume()
    if run.cfg.train.in_cluster:  # the first training step's collectives time out after collective_timeout_s
        barrier(run.strategy, run.cfg.train.worker_wait_s)
    started = time.perf_counter()
    with run.stop:
        run_epochs(run, start_epoch, start_step, recorder)
    stopping = recorder.finish()
    recalibrate_batch_norm(run)
    log.info("final weights sha256 %s (worker %d)", weights_digest(run.model), worker_role(run.strategy)[1])
    model = save_outputs(run, recorder, out, {"resumed_from_epoch": start_epoch,
                                              "seconds_this_run": time.perf_counter() - started, **stopping})
    chief = worker_role(run.strategy)[0]  # the others' outputs are deleted unpublished
    exports = export_formats(model, out, run.cfg.export.formats, run.cfg.export, run.dataset) if chief else {}
    history = recorder.history
    final = {k: history[-1][k] for k in history[-1] if k.split("val_")[-1] in METRIC_NAMES}
    return {**run.facts(), "dataset_fingerprint": run.dataset.fingerprint, "model_path": MODEL_FILE,
            "saved_model_path": exports.get("saved_model", {}).get("path"), "exports": exports,
            "parameters": model.count_params(), "history_path": "history.json", "tensorboard_dir": "tensorboard",
            "epochs": run.cfg.train.epochs, "resumed_from_epoch": start_epoch, "final_metrics": final,
            "image_shape": run.dataset.image_shape, "num_classes": run.dataset.num_classes,
            "input_pixels": RAW_PIXELS, "image_format": run.dataset.image_format, "init_from": run.init_from,
            "label_names": run.dataset.label_names, "loss": run.cfg.train.loss,
            "config": run.cfg.model_dump(mode="json"), **stopping}
