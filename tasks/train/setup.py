"""One training run's set-up: seeds, input pipelines, model and optimizer in the strategy scope, held by the
TrainingRun (run.py) that every later step is handed."""

from __future__ import annotations

import logging
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline_config import PipelineConfig
from tasks.data.reader import make_dataset, per_worker_dataset_fn
from tasks.distributed.devices import strategy_devices, strategy_name
from tasks.errors import PipelineError
from tasks.model.build import build_model
from tasks.model.published import load_model
from tasks.registry.models import resolve_model
from tasks.store.publish import MODEL_FILE
from tasks.store.refs import DatasetArtifact
from tasks.store.staging import local_dataset, local_file
from tasks.store.storage import join
from tasks.train.batch_norm import synchronise_batch_norm
from tasks.train.checkpoints import mirror_dir, work_dir
from tasks.train.objectives import LABEL_MODES
from tasks.train.optimization import make_optimizer
from tasks.train.phases import check_phase_layers, run_phases, set_trainable, warm_start
from tasks.train.run import StopRequest, TrainingRun, steps_per_epoch

log = logging.getLogger("tfpipe.train")


def start_run(cfg: PipelineConfig, dataset: DatasetArtifact, strategy: tf.distribute.Strategy,
              precision: tuple[str, str], fp: str) -> TrainingRun:
    """Seeds, input pipelines, model and optimizer for one run."""
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
    init = init_source(cfg)
    model, optimizers = build_for_training(cfg, dataset, strategy, precision[0], init)
    return TrainingRun(cfg, dataset, strategy, precision[0], precision[1], work_dir(cfg, fp), mirror_dir(cfg, fp),
                       model, optimizers, train_input, val_data, StopRequest(catch=not tc.in_cluster),
                       init_from={"fingerprint": init[0], "uri": init[1]} if init else None)


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


def training_inputs(cfg: PipelineConfig, dataset: DatasetArtifact,
                    strategy: tf.distribute.Strategy) -> tuple[Callable[[int, int], Any], Any]:
    """((epoch, skip) -> training input, validation input): pipelines over the whole cache, or under multi_worker
    dataset functions that give each worker its own part of it. Each epoch's shuffle is seeded by train.seed +
    epoch, so a resumed run reads epoch k in the same order as an uninterrupted one, and a run stopped in the
    middle of an epoch resumes by skipping the batches it had trained on."""
    tc = cfg.train
    replicas = strategy.num_replicas_in_sync
    make = per_worker_dataset_fn if tc.in_cluster else make_dataset
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

    if tc.in_cluster or replicas == 1:  # per_worker_dataset_fn gives every replica the same number of records
        return train_input, make(dataset, "validation", tc.batch_size, label_mode=LABEL_MODES[tc.loss])
    # The last validation batch must split evenly over the replicas: one left empty fails the convolutions, and
    # Keras' evaluation in fit fails on unequal parts (AddN of unequal shapes). Validate on a multiple of the
    # replica count (at most replicas - 1 records fewer).
    count = dataset.counts["validation"]
    return train_input, make_dataset(dataset, "validation", tc.batch_size, label_mode=LABEL_MODES[tc.loss],
                                     records=count - count % replicas)


def init_source(cfg: PipelineConfig) -> tuple[str, str] | None:
    """(fingerprint, directory) of the published model train.init_from names, or None."""
    if not cfg.train.init_from:
        return None
    uri, manifest = resolve_model(cfg.artifacts.root, cfg.train.init_from)
    return manifest["fingerprint"], uri


def build_for_training(cfg: PipelineConfig, dataset: DatasetArtifact, strategy: tf.distribute.Strategy,
                       precision: str, init: tuple[str, str] | None = None,
                       ) -> tuple[keras.Model, list[keras.optimizers.Optimizer]]:
    """Model and an optimizer per phase, all created inside the strategy scope, each optimizer built on its
    phase's trainable weights (the custom loop needs them built); the model starts from `init`'s weights when
    given. The model is left as the first phase trains it."""
    with strategy.scope():
        model = build_model(cfg.model, dataset.image_shape, dataset.num_classes, cfg.train.loss, precision,
                            seed=cfg.train.seed, local_cache=cfg.artifacts.local_cache)
        check_phase_layers(cfg, model)
        if strategy.num_replicas_in_sync > 1:
            synchronise_batch_norm(model)
        if init is not None:
            source = load_model(local_file(join(init[1], MODEL_FILE), cfg.artifacts.local_cache))
            log.info("starting from the weights of model %s (%d layers)", init[0][:12],
                     warm_start(model, source, init[0]))
        steps = steps_per_epoch(dataset.counts["train"], cfg.train.batch_size, strategy.num_replicas_in_sync)
        optimizers = []
        for phase in run_phases(cfg.train):
            set_trainable(model, phase.trainable if phase else "all")
            optimizer = make_optimizer(cfg, precision, steps, phase)
            optimizer.build(model.trainable_variables)
            optimizers.append(optimizer)
        set_trainable(model, cfg.train.phases[0].trainable if cfg.train.phases else "all")
    return model, optimizers
