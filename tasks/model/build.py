"""Building the model: a Keras functional model from the `model.layers` stack or a `model.backbone`, with its head.

The default config is the seed's `basic_cnn` with lighter dropout (see pipeline_config). The model takes raw
pixels: its input is uint8 [0, 255], as the cache and a client's images hold them, and its first layer scales them
to [0, 1] (nothing else that ingest did not do), so `model.keras` and the SavedModel take the images a client has.
The input shape and the number of classes come from the DatasetArtifact, the head from the loss:
Dense(num_classes) + softmax, or Dense(1) + sigmoid for binary crossentropy. The output activation always
computes in float32, whatever the precision policy.
"""

from __future__ import annotations

import keras

from pipeline_config import BackboneConfig, ConfigError, LayerSpec, ModelConfig, PipelineConfig
from tasks.errors import first_line

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


def make_layer(spec: LayerSpec, index: int, dtype_policy: str = "float32", seed: int | None = None) -> keras.layers.Layer:
    """One configured layer, not yet built, its random parts seeded from `seed` when given. Raises ConfigError
    naming it (unknown type, bad arguments)."""
    where = f"config error: model.layers[{index}] ({spec.type})"
    layer_class = LAYERS.get(spec.type)
    if layer_class is None:
        raise ConfigError(f"{where}: unknown layer type: use one of {', '.join(LAYERS)}")
    params = dict(spec.model_extra or {})
    params.setdefault("dtype", dtype_policy)
    try:
        return layer_class(**(params if seed is None else seeded(layer_class, params, seed * 1000 + index)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {first_line(exc)}") from None


def seeded(layer_class: type, params: dict, seed: int) -> dict:
    """The layer's arguments with a seed of its own for each random initializer and for its random ops (Dropout).
    Keras draws unseeded initializers from Python's global `random`, which other threads of the process (Prefect's
    and Dask's clients) draw from too: without seeds, `train.seed` alone would not fix a model's first weights."""
    import inspect

    accepted = inspect.signature(layer_class.__init__).parameters
    params = dict(params)
    for offset, name in enumerate(sorted(n for n in accepted if n.endswith("_initializer"))):
        initializer = keras.initializers.get(params.get(name, accepted[name].default))
        if initializer is not None and "seed" in initializer.get_config():
            config = {**initializer.get_config(), "seed": (seed * 10 + offset) % SEED_RANGE}
            params[name] = type(initializer).from_config(config)
    if "seed" in accepted and params.get("seed") is None:
        params["seed"] = seed % SEED_RANGE
    return params


SEED_RANGE = 2**31 - 1  # seeds Keras takes as int32


def check_model_config(cfg: PipelineConfig) -> None:
    """Reject a bad model.layers or model.backbone before any work (ConfigError): every layer is made, and when the
    image shape is known before ingest (data.image_size or data.image_shape, or the embedded MNIST) the whole model
    is built on it (a backbone: checked against it, and its weights file found). Call it after
    `configure_devices` (it runs TensorFlow ops)."""
    from tasks.data.sources import known_image_shape
    from tasks.model.backbones import check_backbone_input, check_backbone_weights

    shape = known_image_shape(cfg.data)
    if cfg.model.backbone is not None:  # model.layers are not used; the network is built once the data is read
        check_backbone_weights(cfg.model.backbone)
        if shape is not None:
            check_backbone_input(cfg.model.backbone, shape)
        return
    if shape is None:
        for i, spec in enumerate(cfg.model.layers):
            make_layer(spec, i)
        return
    # the number of classes is the dataset's: any count the loss accepts shows whether the stack builds
    build_model(cfg.model, shape, 2 if cfg.train.loss == "binary_crossentropy" else 10, cfg.train.loss)


def build_model(model_cfg: ModelConfig, image_shape: list[int], num_classes: int, loss: str,
                dtype_policy: str = "float32", seed: int | None = None,
                local_cache: str = "~/.cache/tfpipe") -> keras.Model:
    """The configured layer stack (or backbone) with its head, its random parts seeded from `seed` when given
    (training passes train.seed). Raises ConfigError naming the layer that cannot be built."""
    if loss == "binary_crossentropy" and num_classes != 2:
        raise ConfigError(f"config error: train.loss: binary_crossentropy needs exactly 2 classes, the dataset has "
                          f"{num_classes}: use sparse_categorical_crossentropy or categorical_crossentropy")
    inputs = keras.Input(shape=tuple(image_shape), dtype="uint8", name="image")
    if model_cfg.backbone is not None:
        x = backbone_body(model_cfg.backbone, inputs, dtype_policy, seed, local_cache)
    else:
        x = layer_stack(model_cfg, inputs, dtype_policy, seed)
    units, activation = (1, "sigmoid") if loss == "binary_crossentropy" else (num_classes, "softmax")
    head = {"units": units, "dtype": dtype_policy, "name": "logits"}
    x = keras.layers.Dense(**(head if seed is None else seeded(keras.layers.Dense, head, seed * 1000 + 999)))(x)
    outputs = keras.layers.Activation(activation, dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=model_cfg.name)


def backbone_body(backbone: BackboneConfig, inputs, dtype_policy: str, seed: int | None, local_cache: str):
    """Pixels -> the network's preprocessing -> the network -> pooling -> dropout: a flat vector for the head."""
    from tasks.model.backbones import backbone_network, check_backbone_input, preprocessing

    image_shape = list(inputs.shape[1:])
    check_backbone_input(backbone, image_shape)
    x = preprocessing(backbone, dtype_policy)(inputs)
    x = backbone_network(backbone, image_shape, dtype_policy, local_cache)(x)
    pool = keras.layers.GlobalAveragePooling2D if backbone.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pool(dtype=dtype_policy, name="pool")(x)
    dropout = {"rate": backbone.dropout, "dtype": dtype_policy, "name": "head_dropout"}
    return keras.layers.Dropout(**(dropout if seed is None else seeded(keras.layers.Dropout, dropout, seed * 1000 + 998)))(x)


def layer_stack(model_cfg: ModelConfig, inputs, dtype_policy: str, seed: int | None):
    """Pixels scaled to [0, 1], then model.layers: a flat vector for the head."""
    x = keras.layers.Rescaling(1 / 255, dtype=dtype_policy, name="scale_pixels")(inputs)
    for i, spec in enumerate(model_cfg.layers):
        where = f"config error: model.layers[{i}] ({spec.type})"
        layer = make_layer(spec, i, dtype_policy, seed)
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
    return x
