"""A published model as every stage uses it: loaded safely (Keras safe mode), saved without its training state, fed
uint8 pixels, its outputs read as one probability per class."""

from __future__ import annotations

import keras
import numpy as np

from tasks.errors import PipelineError, first_line


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


RAW_PIXELS = "uint8 [0, 255], scaled in the model"  # what a train manifest's input_pixels says


def model_input(model: keras.Model, images):
    """uint8 images as `model` takes them: as they are, or, for a model published before models scaled their
    own input (a float32 input, no input_pixels in its manifest), scaled to [0, 1] here."""
    import tensorflow as tf

    if model.inputs[0].dtype == "uint8":
        return images
    return tf.cast(images, tf.float32) / 255.0


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """The model's outputs as one probability column per class: a single sigmoid unit is P(class 1)."""
    if outputs.shape[1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=1)
    return outputs
