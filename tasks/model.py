"""Stage 2, model: build a Keras functional model from the `model.layers` config.

The default config is the seed's `basic_cnn` with lighter dropout (see pipeline_config). The input shape and the
number of classes come from the DatasetArtifact, the head from the loss: Dense(num_classes) + softmax, or
Dense(1) + sigmoid for binary crossentropy. The output activation always computes in float32, whatever the
precision policy.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline_config import ConfigError, ModelConfig
from tasks.errors import PipelineError, first_line

LAYERS = {
    "Conv2D": keras.layers.Conv2D,
    "MaxPool2D": keras.layers.MaxPool2D,
    "AveragePooling2D": keras.layers.AveragePooling2D,
    "Activation": keras.layers.Activation,
    "Dropout": keras.layers.Dropout,
    "Flatten": keras.layers.Flatten,
    "Dense": keras.layers.Dense,
    "BatchNormalization": keras.layers.BatchNormalization,
    "GlobalAveragePooling2D": keras.layers.GlobalAveragePooling2D,
}


def load_model(path: str) -> keras.Model:
    """A published model, for inference: safe mode (no Python code from the file), no training state."""
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" not in str(exc):
            raise
        raise PipelineError(f"{path} contains Python code (a Lambda layer or a custom function), and tfpipe loads "
                            "models only in Keras safe mode, which refuses it: use a model built from Keras layers "
                            f"({first_line(exc, 120)})") from None


def portable_copy(model: keras.Model) -> keras.Model:
    """The model without its training-only state (compile config with tfpipe's custom metrics, optimizer), so
    that plain `keras.saving.load_model` reads the saved file in any process."""
    copy = type(model).from_config(model.get_config())  # clone_model would copy the compile config too
    copy.set_weights(model.get_weights())
    return copy


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """The model's outputs as one probability column per class: a single sigmoid unit is P(class 1)."""
    if outputs.shape[1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=1)
    return outputs


def build_model(model_cfg: ModelConfig, image_shape: list[int], num_classes: int, loss: str,
                dtype_policy: str = "float32") -> keras.Model:
    """The configured layer stack with its head. Raises ConfigError naming the layer that cannot be built."""
    if loss == "binary_crossentropy" and num_classes != 2:
        raise ConfigError(f"config error: train.loss: binary_crossentropy needs exactly 2 classes, the dataset has "
                          f"{num_classes}: use sparse_categorical_crossentropy or categorical_crossentropy")
    inputs = keras.Input(shape=tuple(image_shape), name="image")
    x = inputs
    for i, spec in enumerate(model_cfg.layers):
        where = f"config error: model.layers[{i}] ({spec.type})"
        layer_class = LAYERS.get(spec.type)
        if layer_class is None:
            raise ConfigError(f"{where}: unknown layer type: use one of {', '.join(LAYERS)}")
        params = dict(spec.model_extra or {})
        params.setdefault("dtype", dtype_policy)
        try:
            layer = layer_class(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {first_line(exc)}") from None
        try:
            x = layer(x)
        except Exception as exc:  # Keras raises ValueError, TF raises InvalidArgumentError for impossible shapes
            raise ConfigError(f"{where}: cannot apply to input of shape {tuple(x.shape)}: {first_line(exc)}") from None
        spatial = x.shape[1:-1]
        if any(d is not None and d < 1 for d in spatial):
            raise ConfigError(f"{where}: shrinks the feature map to {tuple(x.shape[1:])}, below 1x1: remove the "
                              "layer or lower its pool size / strides")
    if len(x.shape) != 2:
        raise ConfigError(f"config error: model.layers: the last layer outputs shape {tuple(x.shape[1:])}; the head "
                          "needs a flat vector: end the stack with Flatten or GlobalAveragePooling2D")
    if loss == "binary_crossentropy":
        x = keras.layers.Dense(1, dtype=dtype_policy, name="logits")(x)
        outputs = keras.layers.Activation("sigmoid", dtype="float32", name="probabilities")(x)
    else:
        x = keras.layers.Dense(num_classes, dtype=dtype_policy, name="logits")(x)
        outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=model_cfg.name)
