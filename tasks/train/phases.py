"""Training in phases (`train.phases`), as the Keras transfer-learning guide does it: first the head on a frozen
backbone, then part or all of the backbone at a lower rate. Each phase sets which layers train and has an
optimizer of its own (its rate and schedule over its epochs); every phase's optimizer is in the checkpoint, so a
run stopped in phase 2 resumes in phase 2. A frozen layer is frozen the Keras way (`trainable = False`): its
BatchNormalization layers then run in inference mode, their statistics untouched. Without phases a run is one
phase that trains every layer, as before. Also here: starting from another model's weights (`train.init_from`).
BatchNormalization's own treatment across replicas and after training is in batch_norm.py.
"""

from __future__ import annotations

import logging

import keras

from pipeline_config import ConfigError, PhaseConfig, PipelineConfig, TrainConfig
from tasks.errors import PipelineError
from tasks.model.backbones import BACKBONE_LAYER

log = logging.getLogger("tfpipe.train")
HEAD_LAYERS = ("pool", "head_dropout", "logits", "probabilities")  # what model.build_model puts after the body


def run_phases(tc: TrainConfig) -> list[PhaseConfig | None]:
    """The phases of a run; [None] for a run without them (one phase, every layer, train's own schedule)."""
    return list(tc.phases) or [None]


def phase_at(tc: TrainConfig, epoch: int) -> int:
    """The index of the phase that epoch `epoch` (from 0) trains in."""
    end = 0
    for index, phase in enumerate(tc.phases):
        end += phase.epochs
        if epoch < end:
            return index
    return max(0, len(tc.phases) - 1)


def body_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The feature extractor's layers in order: the backbone network's, or the layer stack's."""
    names = [layer.name for layer in model.layers]
    if BACKBONE_LAYER in names:
        return list(model.get_layer(BACKBONE_LAYER).layers)
    return [layer for layer in model.layers[1:] if layer.name not in HEAD_LAYERS]


def set_trainable(model: keras.Model, trainable: str) -> None:
    """Freeze and unfreeze for one phase: `all`, `head` (the body frozen), `top:N` (the body's last N layers and
    the head) or `from:NAME` (the body from layer NAME on, and the head). Raises ConfigError for a layer name the
    body does not have."""
    _set_everywhere(model, True)
    if trainable == "all":
        return
    body = body_layers(model)
    if trainable == "head":
        first = len(body)
    elif trainable.startswith("top:"):
        first = max(0, len(body) - int(trainable[4:]))
    else:
        names = [layer.name for layer in body]
        name = trainable[5:]
        if name not in names:
            raise ConfigError(f"config error: train.phases trainable {trainable!r}: the model has no layer {name!r} "
                              f"(its first layers: {', '.join(names[:6])}; last: {', '.join(names[-4:])})")
        first = names.index(name)
    for layer in body[:first]:
        layer.trainable = False


def all_layers(layer: keras.layers.Layer):
    """The layer and every layer inside it, nested models' included."""
    yield layer
    for inner in getattr(layer, "layers", []):
        yield from all_layers(inner)


def _set_everywhere(model: keras.Model, trainable: bool) -> None:
    """`trainable` on every layer: setting it on a nested functional model does not reach its layers once they
    were set one by one."""
    for layer in all_layers(model):
        layer.trainable = trainable


def check_phase_layers(cfg: PipelineConfig, model: keras.Model) -> None:
    """Every phase's trainable spec applies to this model (ConfigError otherwise); the model left trainable."""
    for phase in cfg.train.phases:
        set_trainable(model, phase.trainable)
    _set_everywhere(model, True)


def describe(tc: TrainConfig, index: int, model: keras.Model) -> str:
    phase = tc.phases[index]
    return (f"phase {index + 1}/{len(tc.phases)}: {phase.epochs} epoch(s), trainable {phase.trainable} "
            f"({sum(int(keras.ops.size(v)) for v in model.trainable_variables):,} of "
            f"{sum(int(keras.ops.size(v)) for v in model.weights):,} weights)")


def warm_start(model: keras.Model, source: keras.Model, source_fingerprint: str) -> int:
    """Copy the weights of every layer `source` has under the same name (a nested network as one layer);
    PipelineError naming the first layer whose weights differ in shape. Returns the number of layers copied."""
    copied = 0
    for layer in model.layers:
        if not layer.weights or layer.name not in {other.name for other in source.layers}:
            continue
        theirs = source.get_layer(layer.name).get_weights()
        shapes = ([tuple(w.shape) for w in theirs], [tuple(w.shape) for w in layer.get_weights()])
        if shapes[0] != shapes[1]:
            raise PipelineError(f"train.init_from {source_fingerprint[:12]}: layer {layer.name!r} holds weights of "
                                f"shapes {shapes[0]} there and {shapes[1]} here: start from a model of the same "
                                "architecture and classes, or drop train.init_from")
        layer.set_weights(theirs)
        copied += 1
    if not copied:
        raise PipelineError(f"train.init_from {source_fingerprint[:12]}: no layer of that model has a name of this "
                            "one's: start from a model of the same architecture, or drop train.init_from")
    return copied
