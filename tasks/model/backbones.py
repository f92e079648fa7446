"""keras.applications networks as the body of a model (`model.backbone`): built without their top, their weights
from a file the team provides (a server without internet cannot download ImageNet weights), each family's own
input preprocessing inside the model, from raw uint8 pixels.

Preprocessing: MobileNetV3, EfficientNet, EfficientNetV2 and ConvNeXt rescale and normalise inside the network
(`include_preprocessing`, or built in) and take pixels in [0, 255]; ResNet50V2 takes [-1, 1]
(`keras.applications.resnet_v2.preprocess_input`), done here by a Rescaling layer.
"""

from __future__ import annotations

import warnings

import keras

from pipeline_config import BackboneConfig, ConfigError
from tasks.errors import PipelineError, first_line
from tasks.store import storage
from tasks.store.staging import local_file

MIN_SIDE = 32  # keras.applications refuses smaller inputs without their top
WITH_PREPROCESSING_FLAG = ("MobileNetV3", "EfficientNetV2", "ConvNeXt")  # the others preprocess unasked, or not at all
BACKBONE_LAYER = "backbone"


def check_backbone_input(backbone: BackboneConfig, image_shape: list[int]) -> None:
    """ConfigError, before any work, for images the network cannot take."""
    height, width, channels = image_shape
    if min(height, width) < MIN_SIDE:
        raise ConfigError(f"config error: model.backbone {backbone.name} needs images of at least {MIN_SIDE}x{MIN_SIDE} "
                          f"pixels, the data has {height}x{width}: set data.image_size (e.g. [{max(height, 96)}, "
                          f"{max(width, 96)}]) to resize them at ingest")
    if channels != 3:
        raise ConfigError(f"config error: model.backbone {backbone.name} takes RGB images (3 channels), the data has "
                          f"{channels}: set data.color_mode=rgb")


def check_backbone_weights(backbone: BackboneConfig) -> None:
    if backbone.weights not in (None, "imagenet") and not storage.exists(backbone.weights):
        raise ConfigError(f"config error: model.backbone.weights: no file at {backbone.weights}: give the path of a "
                          f"weights file of {backbone.name} without its top, imagenet, or null")


def weights_fingerprint(backbone: BackboneConfig | None) -> str | None:
    """What the train fingerprint keys on for the starting weights: a file's sha256, or `imagenet`."""
    if backbone is None or backbone.weights in (None, "imagenet"):
        return None if backbone is None else backbone.weights
    return storage.sha256(backbone.weights)


def backbone_network(backbone: BackboneConfig, image_shape: list[int], dtype_policy: str,
                     local_cache: str) -> keras.Model:
    """The network without its top, in `dtype_policy`, with its weights (None, a file, or ImageNet)."""
    make = getattr(keras.applications, backbone.name)
    options = {"include_preprocessing": True} if backbone.name.startswith(WITH_PREPROCESSING_FLAG) else {}
    weights = backbone.weights
    if weights not in (None, "imagenet"):
        weights = local_file(weights, local_cache)  # a bucket path: a verified local copy
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype_policy)  # keras.applications builds its layers in the global policy
    try:
        with warnings.catch_warnings():  # a file that does not fit warns per layer before it fails: one line here
            warnings.simplefilter("ignore", UserWarning)
            # one layer name whatever the family: trainable specs and init_from find it by it
            network = make(input_shape=tuple(image_shape), include_top=False, weights=weights, pooling=None,
                           name=BACKBONE_LAYER, **options)
    except Exception as exc:
        raise _weights_error(backbone, exc) from None
    finally:
        keras.config.set_dtype_policy(previous)
    return network


def _weights_error(backbone: BackboneConfig, exc: Exception) -> PipelineError:
    if backbone.weights == "imagenet":
        return PipelineError(
            f"model.backbone.weights=imagenet: Keras could not fetch the ImageNet weights of {backbone.name} "
            f"({first_line(exc, 240)}); on a machine without internet access, download that file elsewhere and "
            "put it in ~/.keras/models/ (or $KERAS_HOME/models/), where Keras looks first, or set "
            "model.backbone.weights to its path")
    return PipelineError(f"model.backbone.weights {backbone.weights} does not load into {backbone.name} without its "
                         f"top ({first_line(exc, 240)}): give a weights file of that network, include_top=False")


def preprocessing(backbone: BackboneConfig, dtype_policy: str) -> keras.layers.Layer:
    """uint8 pixels to what the network takes: [-1, 1] for ResNet50V2, floats in [0, 255] for the others."""
    if backbone.name == "ResNet50V2":
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype=dtype_policy, name="scale_pixels")
    return keras.layers.Rescaling(1.0, dtype=dtype_policy, name="pixels_as_floats")
