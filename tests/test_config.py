import pytest
import yaml

from pipeline_config import DEFAULT_CONFIG_PATH, ConfigError, fingerprint, load_config
from tests.conftest import run_cli


def test_default_config_reproduces_the_seed():
    cfg = load_config()
    assert cfg.data.source == "mnist"
    assert cfg.model.name == "basic_cnn"
    types = [layer.type for layer in cfg.model.layers]
    assert types.count("Conv2D") == 4 and types.count("MaxPool2D") == 3 and types.count("Dropout") == 3
    assert cfg.train.loss == "sparse_categorical_crossentropy" and cfg.train.optimizer.name == "adam"
    assert cfg.artifacts.root.endswith("artifacts")


def test_yaml_file_and_dotted_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 7, "optimizer": {"name": "sgd"}}, "data": {"shards": 2}}))
    cfg = load_config(path, ["data.source=npz:x.npz", "train.epochs=2", "data.image_shape=[32, 32, 3]",
                             "train.optimizer.learning_rate=0.01"])
    assert cfg.train.epochs == 2  # --set beats the file
    assert cfg.train.optimizer.name == "sgd" and cfg.train.optimizer.learning_rate == 0.01
    assert cfg.train.optimizer.momentum == 0.9  # merged, not replaced
    assert cfg.data.shards == 2 and cfg.data.source == "npz:x.npz" and cfg.data.image_shape == [32, 32, 3]


def test_artifacts_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TFPIPE_ARTIFACTS", str(tmp_path / "env-root"))
    assert load_config().artifacts.root == str(tmp_path / "env-root")
    assert load_config(overrides=[f"artifacts.root={tmp_path}/cli"]).artifacts.root == f"{tmp_path}/cli"


def test_settings_from_the_environment_beat_the_files_and_lose_to_set(monkeypatch, tmp_path):
    config = tmp_path / "team.yaml"
    config.write_text("train:\n  epochs: 7\n  lr_schedule:\n    name: cosine\n")
    monkeypatch.setenv("TFPIPE__TRAIN__EPOCHS", "3")
    monkeypatch.setenv("TFPIPE__TRAIN__LR_SCHEDULE__WARMUP_EPOCHS", "2")
    monkeypatch.setenv("TFPIPE__EXPORT__FORMATS", "[onnx, tflite]")
    cfg = load_config(config)
    assert (cfg.train.epochs, cfg.train.lr_schedule.name, cfg.train.lr_schedule.warmup_epochs) == (3, "cosine", 2)
    assert cfg.export.formats == ["onnx", "tflite"]
    assert load_config(config, overrides=["train.epochs=5"]).train.epochs == 5
    assert load_config(config, overrides={"export.formats": []}).export.formats == []
    monkeypatch.setenv("TFPIPE__TRAIN__EPOCHS", "three")
    with pytest.raises(ConfigError, match=r"train.epochs.*\(set by the environment variable TFPIPE__TRAIN__EPOCHS\)$"):
        load_config()
    monkeypatch.setenv("TFPIPE__TRAIN__EPOCH", "3")
    with pytest.raises(ConfigError, match=r"train.epoch: .*\(set by the environment variable TFPIPE__TRAIN__EPOCH\)$"):
        load_config()


@pytest.mark.parametrize("override, key", [
    ("train.epoch=2", "train.epoch"),
    ("train.epochs=two", "train.epochs"),
    ("data.source=s3:bucket", "data.source"),
    ("bogus.key=1", "bogus"),
    ("train.optimizer.name=adagrad", "train.optimizer.name"),
    ("data.validation_fraction=1.5", "data.validation_fraction"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert key in message and "\n" not in message


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown key \(did you mean epochs\?\)"):
        load_config(path)


def test_fingerprint_is_stable_and_sensitive():
    a, b = load_config(), load_config()
    assert fingerprint(a.data) == fingerprint(b.data)
    assert fingerprint({"x": 1, "y": [1, 2]}) == fingerprint({"y": [1, 2], "x": 1})
    assert fingerprint(a.data) != fingerprint(load_config(overrides=["data.seed=7"]).data)
    assert len(fingerprint(a.train)) == 64


def test_default_yaml_is_valid_yaml():
    assert set(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())) == {
        "rerun", "data", "model", "train", "validate", "evaluate", "export", "predict", "artifacts", "schedule", "serve",
        "tune", "tracking"}


def test_cli_rejects_bad_config_with_exit_2_before_any_work(tmp_path):
    result = run_cli("ingest", "--set", "train.epoch=2", "--set", f"artifacts.root={tmp_path}/a")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["tfpipe: config error: train.epoch: unknown key (did you mean epochs?)"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()


def test_a_bad_model_config_is_rejected_before_ingest(tmp_path):
    """model.layers is checked before ingest writes anything: on the embedded MNIST (its shape is known) the stack
    is built, so a pool that shrinks the map below 1x1 fails; on a source whose shape is known only from its rows,
    every layer is still made, so an unknown type or a bad argument fails."""
    from tests.conftest import invoke_cli

    pool = "model.layers=[{type: Conv2D, filters: 4, kernel_size: 3}, {type: MaxPool2D, pool_size: 64}, {type: Flatten}]"
    code, _, err = invoke_cli("train", "--set", f"artifacts.root={tmp_path}/a", "--set", pool)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("tfpipe: config error: model.layers[1] (MaxPool2D): cannot apply to input of shape "
                               "(None, 26, 26, 4)")
    assert not (tmp_path / "a").exists()
    unknown = "model.layers=[{type: Conv3D, filters: 4}, {type: Flatten}]"
    # an npz source that does not even exist: the model config is refused first
    code, _, err = invoke_cli("train", "--set", f"artifacts.root={tmp_path}/b", "--set",
                              f"data.source=npz:{tmp_path}/none.npz", "--set", unknown)
    assert code == 2 and err.startswith("tfpipe: config error: model.layers[0] (Conv3D): unknown layer type: use one of ")
    assert not (tmp_path / "b").exists()


def test_schema_holds_every_default_and_default_yaml_is_a_copy_of_it():
    from pipeline_config import PipelineConfig

    from_yaml = PipelineConfig.model_validate(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()))
    assert from_yaml.model_dump(mode="json") == PipelineConfig().model_dump(mode="json")


def test_config_with_no_file_builds_the_seed_model():
    from pipeline_config import PipelineConfig
    from tasks.model.build import build_model

    model = build_model(PipelineConfig().model, [28, 28, 1], 10, "sparse_categorical_crossentropy")
    assert model.count_params() == 697_386  # the seed's basic_cnn on MNIST
    assert [type(layer).__name__ for layer in model.layers].count("Conv2D") == 4


@pytest.mark.parametrize("overrides, mode", [
    ([], "fit"),
    (["train.strategy=multi_worker"], "custom"),
    (["train.local_workers=2"], "custom"),
    (["train.mode=custom"], "custom"),
])
def test_auto_mode_resolves_to_the_style_that_runs(overrides, mode):
    assert load_config(overrides=overrides).train.mode == mode


def test_presets_load_and_say_what_they_reach_how_long_and_how_to_run():
    presets = sorted((DEFAULT_CONFIG_PATH.parent / "presets").glob("*.yaml"))
    assert presets
    for preset in presets:
        load_config(preset)
        head = preset.read_text().split("\n\n")[0]
        assert "Reaches:" in head and "Takes:" in head and f"tfpipe run --config pipeline_config/presets/{preset.name}" in head
