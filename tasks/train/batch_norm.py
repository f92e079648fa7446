"""BatchNormalization across replicas and after training: batch statistics synchronised over the global batch, and
the moving statistics recomputed with the final weights ("precise BN")."""

from __future__ import annotations

import logging

import keras

from pipeline_config import ModelConfig
from tasks.data.reader import make_dataset
from tasks.train.objectives import LABEL_MODES
from tasks.train.phases import all_layers
from tasks.train.run import TrainingRun

log = logging.getLogger("tfpipe.train")


def synchronise_batch_norm(model: keras.Model) -> int:
    """Every BatchNormalization layer computes its batch statistics over the global batch (an all-reduce across
    replicas), so the replicas' moving statistics stay equal. Unsynchronised (keras.applications' default),
    each replica's moving mean and variance follow its own part of the batches and the saved model holds the
    first replica's alone. Returns how many layers it set."""
    layers = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.synchronized = True
    return len(layers)


def uses_batch_norm(model_cfg: ModelConfig) -> bool:
    return model_cfg.backbone is not None or any(spec.type == "BatchNormalization" for spec in model_cfg.layers)


def recalibrate_batch_norm(run: TrainingRun) -> None:
    """The moving mean and variance of every BatchNormalization layer that trained, recomputed with the final
    weights: the average of their batch statistics over `train.bn_recalibration_batches` training batches (in
    the seeded order of an epoch after the last, without augmentation), as "precise BN" does. During training
    the moving averages (momentum 0.99-0.999 in keras.applications) trail weights that keep changing; a network
    trained from scratch in a few epochs can then predict one class in inference mode while it is right in
    training mode. Layers frozen in the last phase keep their statistics."""
    tc = run.cfg.train
    layers = [layer for layer in all_layers(run.model)
              if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not layers or not tc.bn_recalibration_batches:
        return
    momentum = [layer.momentum for layer in layers]
    batches = make_dataset(run.dataset, "train", tc.batch_size, shuffle_buffer=run.cfg.data.shuffle_buffer,
                           seed=tc.seed + tc.epochs, label_mode=LABEL_MODES[tc.loss])
    for count, (images, _) in enumerate(batches.take(tc.bn_recalibration_batches)):
        for layer in layers:
            layer.momentum = count / (count + 1)  # the first batch replaces the statistics, the rest average in
        run.model(images, training=True)
    for layer, value in zip(layers, momentum):
        layer.momentum = value
    log.info("BatchNormalization statistics of %d layers recomputed on %d training batches", len(layers), count + 1)
