"""The model section: the layer stack (the seed's basic_cnn by default) or a keras.applications backbone, and the
model card's words."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline_config.base import Section

# The seed's basic_cnn, layer for layer, with lighter dropout after the two convolution blocks (0.1 and 0.25
# where the seed has 0.5): with augmentation doing part of the regularising, the seed's rates under-fit in 10
# epochs (the default schedule and augmentation in a plain script, three seeds: 99.61% each; the seed's rates
# with two of those seeds: 99.53% and 99.57%). The input shape and the output head (Dense(num_classes) +
# softmax, or Dense(1) + sigmoid for binary crossentropy) come from the dataset and the loss.
def _conv(filters: int) -> dict:
    return {"type": "Conv2D", "filters": filters, "kernel_size": 3, "strides": 1, "padding": "same"}


def _dropout(rate: float) -> dict:
    return {"type": "Dropout", "rate": rate}


_RELU = {"type": "Activation", "activation": "relu"}
_POOL = {"type": "MaxPool2D", "pool_size": 2, "strides": 2}
DEFAULT_LAYERS = [_conv(32), _RELU, _conv(32), _RELU, _POOL, _RELU, _dropout(0.1),
                  _conv(64), _RELU, _POOL, _RELU,
                  _conv(128), _RELU, _POOL, _RELU, _dropout(0.25),
                  {"type": "Flatten"}, {"type": "Dense", "units": 512}, _RELU, _dropout(0.5)]


class LayerSpec(BaseModel):
    """One layer: `type` plus the Keras constructor arguments of that layer."""

    model_config = ConfigDict(extra="allow")
    type: str


BACKBONES = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0", "EfficientNetB1", "EfficientNetB2",
             "EfficientNetB3", "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "ResNet50V2", "ConvNeXtTiny")


class BackboneConfig(Section):
    """A keras.applications network under the head (model.layers are then not used)."""

    name: Literal[BACKBONES]  # type: ignore[valid-type]
    weights: str | None = Field(None, description="null (random), a local or bucket path to a weights file of the "
                                "network without its top (its sha256 is part of the model's fingerprint), or "
                                "imagenet (Keras' download, or its copy in ~/.keras/models)")
    pooling: Literal["avg", "max"] = "avg"
    dropout: float = Field(0.2, ge=0, lt=1, description="before the head")


class ModelCardConfig(Section):
    """What the model card says that no run can measure (not part of the model's fingerprint)."""

    intended_use: str = "not stated: set model.card.intended_use"
    limitations: str = "not stated: set model.card.limitations"
    owners: list[str] = Field(default_factory=list)


class ModelConfig(Section):
    name: str = "basic_cnn"
    layers: list[LayerSpec] = Field(default_factory=lambda: [LayerSpec(**layer) for layer in DEFAULT_LAYERS])
    backbone: BackboneConfig | None = None
    card: ModelCardConfig = Field(default_factory=ModelCardConfig)
