"""Transfer learning: keras.applications backbones with weights from a file, training in phases (frozen, then
fine-tuned), resumed in phase 2 after a kill -9, and warm starts from a published model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from pipeline_config import BackboneConfig, ConfigError
from tasks.errors import PipelineError
from tests.conftest import REPO, LineWatch, crash, invoke_cli, make_config, tfpipe_process

MOBILENET = ["data.limit=300", "data.image_size=[32,32]", "data.color_mode=rgb", "train.batch_size=32",
             "model.backbone={name: MobileNetV3Small, dropout: 0.1}", "train.lr_schedule.name=constant",
             "data.augment.translation=0", "data.augment.rotation=0", "data.augment.zoom=0",
             "export.formats=[]"]  # the serving formats are tests/serve/test_export.py's: model.keras only here
TWO_PHASES = "train.phases=[{epochs: 1, trainable: head, learning_rate: 0.005}, {epochs: 1, trainable: all, learning_rate: 0.0005}]"


def cli_sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A MobileNetV3Small without its top, random weights, saved as a weights file: what a team would bring."""
    from tasks.model.backbones import backbone_network

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small_no_top.weights.h5"
    network = backbone_network(BackboneConfig(name="MobileNetV3Small"), [32, 32, 3], "float32", "/tmp")
    network.save_weights(path)
    return path, [w.copy() for w in network.get_weights()]


def backbone_weights(model_dir) -> list[np.ndarray]:
    from tasks.model.published import load_model

    return load_model(f"{model_dir}/model.keras").get_layer("backbone").get_weights()


def test_backbone_weights_load_from_a_file_and_key_the_fingerprint(weights_file, tmp_path):
    from tasks.model.backbones import backbone_network, check_backbone_weights, weights_fingerprint
    from tasks.store import storage

    path, saved = weights_file
    loaded = backbone_network(BackboneConfig(name="MobileNetV3Small", weights=str(path)), [32, 32, 3], "float32",
                              str(tmp_path))
    assert len(loaded.get_weights()) == len(saved)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), saved))
    assert weights_fingerprint(BackboneConfig(name="MobileNetV3Small", weights=str(path))) == storage.sha256(str(path))
    with pytest.raises(PipelineError, match=r"does not load into EfficientNetB0 without its top \("):
        backbone_network(BackboneConfig(name="EfficientNetB0", weights=str(path)), [32, 32, 3], "float32", "/tmp")
    with pytest.raises(ConfigError, match="model.backbone.weights: no file at /nowhere.h5"):
        check_backbone_weights(BackboneConfig(name="MobileNetV3Small", weights="/nowhere.h5"))


def test_a_backbone_on_images_it_cannot_take_is_a_one_line_config_error(root):
    code, _, err = invoke_cli("train", *cli_sets(f"artifacts.root={root}", "model.backbone={name: ResNet50V2}"))
    assert code == 2 and err.count("\n") == 1
    assert "model.backbone ResNet50V2 needs images of at least 32x32 pixels, the data has 28x28: set " \
           "data.image_size" in err
    assert not root.exists()  # before any work
    code, _, err = invoke_cli("train", *cli_sets(f"artifacts.root={root}", "model.backbone={name: ConvNeXtTiny}",
                                                 "data.image_size=[32,32]", "data.color_mode=grayscale"))
    assert code == 2 and "takes RGB images (3 channels), the data has 1: set data.color_mode=rgb" in err


def test_a_frozen_phase_leaves_the_backbone_bit_identical_and_the_next_changes_it(weights_file, tmp_path):
    """From the weights file: one head-only phase publishes the file's backbone weights and BatchNormalization
    statistics bit for bit while the head learns; a second phase that trains everything changes both."""
    from tasks.data.ingest import ingest
    from tasks.model.build import build_model
    from tasks.model.published import load_model
    from tasks.train.stage import train

    path, saved = weights_file
    base = ["train.precision=float32", f"model.backbone={{name: MobileNetV3Small, weights: {path}}}"]
    cfg = make_config(tmp_path / "a", *MOBILENET, *base, "train.phases=[{epochs: 1, trainable: head}]")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    frozen = train(cfg, dataset)
    assert all(np.array_equal(a, b) for a, b in zip(backbone_weights(frozen.uri), saved))
    names = [v.path for v in load_model(f"{frozen.uri}/model.keras").get_layer("backbone").weights]
    assert any("moving_mean" in n for n in names) and any("moving_variance" in n for n in names)
    start = build_model(cfg.model, dataset.image_shape, dataset.num_classes, cfg.train.loss, seed=cfg.train.seed,
                        local_cache=cfg.artifacts.local_cache).get_layer("logits").get_weights()[0]
    learned = load_model(f"{frozen.uri}/model.keras").get_layer("logits").get_weights()[0]
    assert not np.array_equal(start, learned)  # the head learned

    cfg = make_config(tmp_path / "b", *MOBILENET, *base, TWO_PHASES)
    both = train(cfg, ingest(cfg.data, cfg.artifacts.root))
    after = dict(zip(names, backbone_weights(both.uri)))
    before = dict(zip(names, saved))
    kernels = [n for n in names if n.endswith("kernel")]
    statistics = [n for n in names if "moving_mean" in n]
    assert all(not np.array_equal(after[n], before[n]) for n in kernels[-3:])
    assert sum(not np.array_equal(after[n], before[n]) for n in statistics) >= len(statistics) // 2
    history = json.load(open(f"{both.uri}/history.json"))["epochs"]
    assert [h["phase"] for h in history] == [1, 2]
    assert [h["learning_rate"] for h in history] == pytest.approx([0.005, 0.0005])


# Two-replica runs in processes of their own: MirroredStrategy's collective instance keys restart with every
# strategy, and TensorFlow caches an instance's shapes per process, so a strategy over other shapes later in the
# same process fails ("Shape mismatch in the collective instance 100"); one training per process, as tfpipe runs.
@pytest.mark.parametrize("mode", ["fit", "custom"])
def test_phases_in_both_styles_on_two_replicas_in_mixed_precision(tmp_path, mode):
    from tests.conftest import run_cli

    result = run_cli("train", "--json", *cli_sets(
        f"artifacts.root={tmp_path}", *MOBILENET, "train.cpu_replicas=2", f"train.mode={mode}",
        "train.precision=mixed_bfloat16",
        "train.phases=[{epochs: 1, trainable: head}, {epochs: 1, trainable: 'top:12', learning_rate: 0.0002}]",
        # and once, every serving format of a bf16 backbone (its nested layers recast to float32 for TFLite/ONNX)
        *(["export.formats=[saved_model,tflite,onnx]"] if mode == "custom" else [])))
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = json.loads(result.stdout)
    assert artifact["replicas"] == 2 and artifact["precision"] == "mixed_bfloat16" and artifact["epochs"] == 2
    if mode == "custom":
        assert sorted(artifact["exports"]) == ["onnx", "saved_model", "tflite"]
        assert all(e["parity"]["label_agreement"] >= 0.999 for e in artifact["exports"].values())
    log = result.stderr
    assert "phase 1/2: 1 epoch(s), trainable head" in log and "phase 2/2: 1 epoch(s), trainable top:12" in log
    frozen, tuned = (int(re.search(rf"phase {i}/2: .*\(([\d,]+) of", log).group(1).replace(",", "")) for i in (1, 2))
    assert 0 < frozen < tuned


SYNCHRONISED_REPLICAS = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from tasks.train.batch_norm import synchronise_batch_norm
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    inputs = keras.Input((4,))
    norm = keras.layers.BatchNormalization()
    model = keras.Model(inputs, keras.layers.Dense(1)(norm(inputs)))
    count = synchronise_batch_norm(model) if sys.argv[1] == "sync" else 0
    model.compile("sgd", "mse")
x = np.concatenate([np.zeros((8, 4)), np.full((8, 4), 10.0)]).astype("float32")  # replica 0: zeros, 1: tens
model.fit(x, np.zeros((16, 1)), batch_size=16, epochs=1, shuffle=False, verbose=0)
replicas = [v.numpy().tolist() for v in norm.moving_mean._value.values]  # the tf.distribute MirroredVariable
print(json.dumps({"count": count, "replicas": replicas}))
"""


@pytest.mark.parametrize("how", ["sync", "default"])
def test_batch_norm_statistics_stay_equal_across_replicas(how):
    """Two replicas given batches of different content: synchronised, their moving means are one (the global
    batch's, 5); unsynchronised, each follows its own half and the first replica's alone would be saved."""
    proc = subprocess.run([sys.executable, "-c", SYNCHRONISED_REPLICAS, how], capture_output=True, text=True,
                          cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = (np.array(r) for r in result["replicas"])
    if how == "sync":
        assert result["count"] == 1
        np.testing.assert_array_equal(first, second)
        np.testing.assert_allclose(first, 0.01 * 5.0)  # momentum 0.99 towards the global mean
    else:
        np.testing.assert_allclose(first, 0.0)  # its half: zeros
        np.testing.assert_allclose(second, 0.01 * 10.0)  # its half: tens


def final_digest(stderr: str) -> str:
    return re.search(r"final weights sha256 ([0-9a-f]{64})", stderr).group(1)


def test_killed_in_phase_two_resumes_in_phase_two_with_the_uninterrupted_weights(tmp_path):
    sets = [*MOBILENET, "train.precision=float32", "train.deterministic=true",
            "train.phases=[{epochs: 1, trainable: head}, {epochs: 2, trainable: 'top:20', learning_rate: 0.001}]"]
    whole = subprocess.run([sys.executable, "-m", "flows.cli", "train", *cli_sets(f"artifacts.root={tmp_path / 'a'}",
                                                                                 *sets)],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    root = tmp_path / "b"
    args = ["train", "--json", *cli_sets(f"artifacts.root={root}", *sets)]
    with tfpipe_process(*args) as proc:
        LineWatch(proc.stderr).wait_for(r"epoch 2/3: ", timeout=300)  # phase 2's first epoch is checkpointed
        crash(proc)
    assert not [p for p in (root / "train").iterdir() if not p.name.startswith(".")]  # nothing published
    resumed = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    artifact = json.loads(resumed.stdout)
    assert artifact["resumed_from_epoch"] >= 2
    assert "phase 2/2: 2 epoch(s), trainable top:20" in resumed.stderr  # resumed in phase 2, its layers unfrozen
    assert final_digest(resumed.stderr) == final_digest(whole.stderr)


def test_warm_start_from_the_champion_and_the_published_model_takes_uint8_in_plain_keras(weights_file, tmp_path):
    from tasks.model.published import load_model
    from tasks.store.publish import read_manifest

    path, _ = weights_file
    root = tmp_path / "artifacts"
    sets = [f"artifacts.root={root}", *MOBILENET, f"model.backbone={{name: MobileNetV3Small, weights: {path}}}",
            "evaluate.min_accuracy=0", "train.precision=float32", TWO_PHASES]
    code, out, err = invoke_cli("evaluate", "--json", *cli_sets(*sets))
    assert code == 0 and json.loads(out)["blessed"], err
    champion = json.loads(out)["model_fingerprint"]
    code, out, err = invoke_cli("train", "--json", *cli_sets(*sets[:-1], "train.init_from=champion",
                                                             "train.phases=[{epochs: 1, trainable: head}]"))
    assert code == 0, err
    warm = json.loads(out)
    assert warm["init_from"]["fingerprint"] == champion and warm["fingerprint"] != champion
    assert read_manifest(warm["uri"])["init_from"]["fingerprint"] == champion
    started = backbone_weights(f"{root}/train/{champion}")
    assert all(np.array_equal(a, b) for a, b in zip(backbone_weights(warm["uri"]), started))  # frozen: as started
    code, _, err = invoke_cli("evaluate", *cli_sets(*sets[:-1], "train.init_from=champion",
                                                    "train.phases=[{epochs: 1, trainable: head}]"))
    assert code == 0, err
    assert f"- started from: model {champion[:12]} (`{root}/train/{champion}`)" in \
        open(f"{warm['uri']}/model_card.md").read()
    # a plain Keras process: no tfpipe code, uint8 pixels in
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    script = f"""
import json, sys, numpy as np, keras
model = keras.saving.load_model("{warm['uri']}/model.keras", compile=False, safe_mode=True)
assert model.inputs[0].dtype == "uint8", model.inputs[0].dtype
print(json.dumps(model.predict(np.load("{tmp_path}/x.npy"), verbose=0).tolist()))
assert not {{"tasks", "pipeline_config"}} & {{m.split(".")[0] for m in sys.modules}}
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(json.loads(proc.stdout.strip().splitlines()[-1]),
                               load_model(f"{warm['uri']}/model.keras").predict(x, verbose=0), atol=1e-5)
    # a model of another architecture: one line naming the layer that does not fit
    code, _, err = invoke_cli("train", *cli_sets(f"artifacts.root={root}", "data.limit=300", "train.epochs=1",
                                                 f"train.init_from={champion}"))
    assert code == 1 and err.count("\n") == 1
    assert f"train.init_from {champion[:12]}: layer 'logits' holds weights of shapes" in err


def test_phases_on_two_multi_worker_workers(tmp_path):
    """The layer stack plays the backbone: its head alone, then everything, on two workers in step."""
    from tests.conftest import run_cli
    from tests.train.test_cluster import weight_digests

    result = run_cli("train", "--json", *cli_sets(
        f"artifacts.root={tmp_path}", "data.limit=300", "train.batch_size=32", "train.local_workers=2",
        "train.lr_schedule.name=constant",
        "train.phases=[{epochs: 1, trainable: head}, {epochs: 1, trainable: all, learning_rate: 0.0005}]"),
        timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    artifact = json.loads(result.stdout)
    assert artifact["strategy"] == "MultiWorkerMirroredStrategy" and artifact["epochs"] == 2
    digests = weight_digests(result.stderr)
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    history = json.load(open(f"{artifact['uri']}/history.json"))["epochs"]
    assert [h["phase"] for h in history] == [1, 2]
    assert [h["learning_rate"] for h in history][1] == pytest.approx(0.0005)


def test_batch_norm_statistics_are_recomputed_with_the_final_weights(tmp_path):
    """With one recalibration batch, the first BatchNormalization layer's moving mean is that batch's mean of
    its input under the published weights (the seeded first batch of the epoch after the last)."""
    import keras

    from tasks.data.ingest import ingest
    from tasks.data.reader import make_dataset
    from tasks.model.published import load_model
    from tasks.train.stage import train

    cfg = make_config(tmp_path, *MOBILENET, "train.epochs=1", "train.precision=float32",
                      "train.bn_recalibration_batches=1")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    model = load_model(f"{train(cfg, dataset).uri}/model.keras")
    network = model.get_layer("backbone")
    norm = next(layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization))
    upto = keras.Model(network.inputs, norm.input)
    images, _ = next(iter(make_dataset(dataset, "train", cfg.train.batch_size, shuffle_buffer=cfg.data.shuffle_buffer,
                                       seed=cfg.train.seed + cfg.train.epochs, label_mode="sparse")))
    features = upto(model.get_layer("pixels_as_floats")(images))
    np.testing.assert_allclose(norm.moving_mean.numpy(), np.mean(features, axis=(0, 1, 2)), atol=1e-4)


def test_imagenet_weights_on_a_machine_that_cannot_download_them_stop_in_one_line(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("train", *cli_sets(f"artifacts.root={tmp_path / 'artifacts'}", *MOBILENET,
                                        "model.backbone={name: MobileNetV3Small, weights: imagenet}"),
                     # no copy of the file there, and no way out: a proxy on a closed loopback port refuses at once
                     env={"KERAS_HOME": str(tmp_path / "keras-home"), "https_proxy": "http://127.0.0.1:9",
                          "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tfpipe: error: model.backbone.weights=imagenet: Keras could not fetch the ImageNet "
                           "weights of MobileNetV3Small (URL fetch failure on https://")
    assert last.endswith("put it in ~/.keras/models/ (or $KERAS_HOME/models/), where Keras looks first, or set "
                         "model.backbone.weights to its path")
    assert "Traceback" not in result.stderr
