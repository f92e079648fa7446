import pytest

from bench.bare_keras import basic_cnn as seed_basic_cnn  # the seed's model, written out by hand
from pipeline_config import ConfigError, load_config
from tasks.model.build import build_model


def describe(model):
    return [(type(layer).__name__, tuple(layer.output.shape), layer.count_params(),
             getattr(layer, "activation", None) and layer.activation.__name__) for layer in model.layers]


def test_default_config_is_the_seed_basic_cnn_layer_for_layer_with_lighter_dropout():
    cfg = load_config()
    model = build_model(cfg.model, [28, 28, 1], 10, cfg.train.loss)
    expected = seed_basic_cnn()
    assert model.name == "basic_cnn"
    # the seed scales pixels before the model; tfpipe's model takes uint8 pixels and scales them first thing
    assert model.inputs[0].dtype == "uint8" and type(model.layers[1]).__name__ == "Rescaling"
    assert model.layers[1].scale == pytest.approx(1 / 255) and model.layers[1].offset == 0
    assert describe(model)[2:] == describe(expected)[1:]
    assert model.count_params() == expected.count_params() == 697_386  # 320 + 9248 + 18496 + 73856 + 590336 + 5130
    rates = [layer.rate for layer in model.layers if type(layer).__name__ == "Dropout"]
    assert rates == [0.1, 0.25, 0.5]
    assert [layer.rate for layer in expected.layers if type(layer).__name__ == "Dropout"] == [0.5, 0.5, 0.5]


def test_input_shape_and_classes_come_from_the_dataset():
    cfg = load_config()
    model = build_model(cfg.model, [32, 32, 3], 5, cfg.train.loss)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 5)


def test_binary_head_is_one_sigmoid_unit_and_needs_two_classes():
    cfg = load_config()
    model = build_model(cfg.model, [28, 28, 1], 2, "binary_crossentropy")
    assert model.output_shape == (None, 1) and model.layers[-1].activation.__name__ == "sigmoid"
    with pytest.raises(ConfigError, match="binary_crossentropy needs exactly 2 classes, the dataset has 10"):
        build_model(cfg.model, [28, 28, 1], 10, "binary_crossentropy")


@pytest.mark.parametrize("layers, match", [
    ("[{type: Conv2D, filters: 8, kernel_size: 3}, {type: Conv3X}]", r"model\.layers\[1\] \(Conv3X\): unknown layer type"),
    ("[{type: Conv2D, filters: 8, kernel_size: 3, pading: same}, {type: Flatten}]", r"model\.layers\[0\] \(Conv2D\).*pading"),
    ("[{type: Dense, units: -3}]", r"model\.layers\[0\] \(Dense\)"),
    ("[{type: MaxPool2D, pool_size: 2}, {type: MaxPool2D, pool_size: 2}, {type: MaxPool2D, pool_size: 2},"
     " {type: MaxPool2D, pool_size: 2}, {type: MaxPool2D, pool_size: 2}, {type: Flatten}]", r"model\.layers\[\d\] \(MaxPool2D\)"),
    ("[{type: Conv2D, filters: 8, kernel_size: 3}]", r"needs a flat vector"),
])
def test_bad_model_configs_fail_naming_the_layer(layers, match):
    cfg = load_config(overrides=[f"model.layers={layers}"])
    with pytest.raises(ConfigError, match=match) as info:
        build_model(cfg.model, [28, 28, 1], 10, cfg.train.loss)
    assert "\n" not in str(info.value)


def test_a_seeded_model_starts_the_same_whatever_else_draws_random_numbers():
    """Keras draws unseeded initializers from Python's global `random`, which Prefect's and Dask's threads use
    too: training seeds every initializer and dropout from train.seed, so other draws change nothing."""
    import random

    import numpy as np

    cfg = load_config()
    first = build_model(cfg.model, [28, 28, 1], 10, cfg.train.loss, seed=42)
    random.random()  # what another thread may do between two runs
    again = build_model(cfg.model, [28, 28, 1], 10, cfg.train.loss, seed=42)
    other = build_model(cfg.model, [28, 28, 1], 10, cfg.train.loss, seed=43)
    for a, b in zip(first.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.get_weights()[0], other.get_weights()[0])
    assert [layer.seed for layer in first.layers if type(layer).__name__ == "Dropout"] == [42006, 42015, 42019]
