"""How training steps: the optimizer and the learning-rate schedule."""

from __future__ import annotations

import keras

from pipeline_config import PhaseConfig, PipelineConfig


def learning_rate(cfg: PipelineConfig, steps_per_epoch: int, phase: PhaseConfig | None = None):
    """train.optimizer.learning_rate shaped by train.lr_schedule, in optimizer steps (restored with the optimizer's
    iteration count, so a resumed run continues on the same curve); in a phase, the phase's rate and schedule
    (train's where it sets none) over the phase's epochs."""
    rate = (phase and phase.learning_rate) or cfg.train.optimizer.learning_rate
    sc = (phase and phase.lr_schedule) or cfg.train.lr_schedule
    epochs = phase.epochs if phase else cfg.train.epochs
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


def make_optimizer(cfg: PipelineConfig, precision: str, steps_per_epoch: int = 1,
                   phase: PhaseConfig | None = None) -> keras.optimizers.Optimizer:
    opt = cfg.train.optimizer
    rate = learning_rate(cfg, steps_per_epoch, phase)
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
