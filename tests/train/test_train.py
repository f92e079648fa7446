import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from pipeline_config import ConfigError
from tasks.data.ingest import ingest
from tasks.data.reader import make_dataset
from tasks.distributed.devices import make_strategy
from tasks.model.published import load_model
from tasks.train.checkpoints import EpochRecorder
from tasks.train.loops import run_epochs
from tasks.train.objectives import make_loss
from tasks.train.setup import start_run
from tasks.train.stage import train
from tests.conftest import (PLAIN_TRAINING, REPO, crash, invoke_cli, make_config, mnist_arrays, saved_epochs,
                            tfpipe_process, write_parquet_source)


def replica_values(variable):
    """The per-replica copies of a (Keras-wrapped) mirrored variable."""
    inner = getattr(variable, "value", variable)
    return [v.numpy() for v in getattr(inner, "values", (inner,))]


@pytest.mark.parametrize("mode", ["fit", "custom"])
def test_two_replicas_reduce_the_loss_and_stay_identical(root, mode, caplog):
    cfg = make_config(root, "data.limit=1280", "train.cpu_replicas=2", "train.batch_size=64", "train.epochs=2",
                      f"train.mode={mode}", "train.precision=float32", "train.optimizer.learning_rate=0.003")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    strategy = make_strategy(cfg.train)
    assert strategy.num_replicas_in_sync == 2
    run = start_run(cfg, dataset, strategy, ("float32", "set by the test"), "test")
    model = run.model
    x, y = next(iter(make_dataset(dataset, "train", 256)))
    loss = make_loss(cfg.train.loss)
    before = float(loss(y, model(x, training=False)))
    recorder = EpochRecorder(run)
    with caplog.at_level("INFO", logger="tfpipe"):
        run_epochs(run, 0, 0, recorder)
    after = float(loss(y, model(x, training=False)))
    assert after < before * 0.85, (before, after)
    assert [h["epoch"] for h in recorder.history] == [1, 2]
    metrics = {"loss", "accuracy", "precision", "recall", "val_loss", "val_accuracy", "val_precision", "val_recall"}
    assert metrics <= set(recorder.history[-1])
    for variable in model.trainable_variables:
        copies = replica_values(variable)
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])
    # one log line per epoch in both styles, the same keys (no print from the library: stdout stays the result's)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [l.split(":")[0] for l in lines] == ["epoch 1/2", "epoch 2/2"]
    assert sorted(k.split("=")[0] for k in lines[0].split(": ", 1)[1].split(", ")[:-1]) == sorted(metrics)


@pytest.mark.parametrize("mode", ["fit", "custom"])
def test_train_stage_publishes_a_model_artifact_under_two_replicas(root, mode, monkeypatch):
    monkeypatch.delenv("TFPIPE__EXPORT__FORMATS")  # the default serving formats (a SavedModel)
    # 357 training records in batches of 4: a last batch of one record would leave one replica an empty batch,
    # which fails oneDNN's convolutions; whole batches only
    cfg = make_config(root, "data.limit=400", "train.cpu_replicas=2", "train.batch_size=4", "train.epochs=1",
                      f"train.mode={mode}")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    assert dataset.counts["train"] % 4 == 1
    seen = []
    artifact = train(cfg, dataset, on_epoch=seen.append)
    assert artifact.replicas == 2 and artifact.per_replica_batch_size == 2 and artifact.mode == mode
    assert len(artifact.devices) == 2 and artifact.dataset_fingerprint == dataset.fingerprint
    assert [r["epoch"] for r in seen] == [1]
    history = json.load(open(f"{artifact.uri}/history.json"))
    record = history["epochs"][0]
    assert [h["epoch"] for h in history["epochs"]] == [1] and 0 < record["train_seconds"] <= record["wall_seconds"]
    trained = dataset.counts["train"] - 1  # 89 whole batches of 4; the record left over is not trained on
    assert record["images_per_second"] == pytest.approx(trained / record["train_seconds"])
    assert history["precision"] == artifact.precision and history["replicas"] == 2
    assert os.path.isdir(f"{artifact.uri}/tensorboard") and os.listdir(f"{artifact.uri}/tensorboard")
    assert os.path.exists(f"{artifact.uri}/saved_model/saved_model.pb")
    model = load_model(f"{artifact.uri}/model.keras")
    assert model.predict(np.zeros((2, 28, 28, 1), np.float32), verbose=0).shape == (2, 10)
    again = train(cfg, dataset)
    assert again.cache_hit and again.fingerprint == artifact.fingerprint
    assert not [p for p in os.listdir(f"{root}/train") if p.startswith(".")]  # no work or temp dirs left


@pytest.mark.parametrize("mode", ["fit", "custom"])
def test_categorical_and_binary_losses_train(root, tmp_path, mode):
    cfg = make_config(root, "data.limit=600", "train.loss=categorical_crossentropy", "train.epochs=3",
                      "train.batch_size=50", f"train.mode={mode}", "train.optimizer.name=sgd",
                      "train.optimizer.learning_rate=0.05", "train.precision=float32")
    artifact = train(cfg, ingest(cfg.data, cfg.artifacts.root))
    history = json.load(open(f"{artifact.uri}/history.json"))["epochs"]
    assert history[-1]["loss"] < history[0]["loss"]  # one-hot labels reach the loss: it learns
    assert artifact.final_metrics["val_accuracy"] > 0.3  # 10 classes: chance is 0.1

    x, y = mnist_arrays("train", 1000)
    keep = y < 2
    src = write_parquet_source(tmp_path / "binary", (x[keep][:200], y[keep][:200]), (x[keep][200:], y[keep][200:]),
                               metadata={"image_shape": "[28, 28, 1]"})
    cfg = make_config(root, f"data.source=parquet:{src}", "train.loss=binary_crossentropy", "train.epochs=2",
                      "train.batch_size=20", f"train.mode={mode}", "train.optimizer.name=rmsprop")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    assert dataset.num_classes == 2
    artifact = train(cfg, dataset)
    assert artifact.final_metrics["val_accuracy"] > 0.8  # 0 vs 1 is easy
    assert load_model(f"{artifact.uri}/model.keras").output_shape == (None, 1)


def test_deterministic_runs_give_identical_weights(tmp_path):
    weights = []
    for run in ("a", "b"):
        cfg = make_config(tmp_path / run, "data.limit=300", "train.epochs=1", "train.batch_size=32",
                          "train.deterministic=true", "train.cpu_replicas=2")
        artifact = train(cfg, ingest(cfg.data, cfg.artifacts.root))
        weights.append(load_model(f"{artifact.uri}/model.keras").get_weights())
    assert len(weights[0]) == len(weights[1])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_killed_training_resumes_from_the_last_completed_epoch(root):
    args = ["train", "--set", f"artifacts.root={root}", "--set", "data.limit=2000", "--set", "train.epochs=3",
            "--set", "train.batch_size=64", "--set", "train.precision=float32", "--json"]
    with tfpipe_process(*args) as proc:
        deadline = time.time() + 240
        index = None
        while time.time() < deadline and proc.poll() is None:
            found = list((root / "train").glob(".work-*/checkpoints/checkpoint")) if (root / "train").exists() else []
            if found:
                index = found[0]
                break
            time.sleep(0.05)
        assert index is not None, proc.communicate()[1][-2000:]
        crash(proc)  # a real crash: no chance to clean up
    assert not [p for p in (root / "train").iterdir() if not p.name.startswith(".")]  # nothing published
    done = saved_epochs(index.read_text())  # what the killed run had checkpointed
    code, out, err = invoke_cli(*args)
    assert code == 0, err
    artifact = json.loads(out)
    assert 1 <= done < 3 and artifact["resumed_from_epoch"] == done
    history = json.load(open(f"{artifact['uri']}/history.json"))
    assert [h["epoch"] for h in history["epochs"]] == [1, 2, 3]
    assert history["resumed_from_epoch"] == artifact["resumed_from_epoch"]


def test_cli_train_with_two_cpu_replicas(root):
    # 43 validation records in batches of 42: validation on 42, so that the last batch does not leave a replica empty
    code, out, err = invoke_cli("train", "--set", f"artifacts.root={root}", "--set", "data.limit=400",
                                "--set", "train.cpu_replicas=2", "--set", "train.epochs=1", "--set", "train.mode=custom",
                                "--set", "train.batch_size=42", "--json")
    assert code == 0, err
    artifact = json.loads(out)
    assert artifact["replicas"] == 2 and artifact["epochs"] == 1
    assert load_model(f"{artifact['uri']}/model.keras").input_shape == (None, 28, 28, 1)


def test_batch_size_must_split_over_replicas(root):
    code, _, err = invoke_cli("train", "--set", f"artifacts.root={root}", "--set", "data.limit=50",
                              "--set", "train.cpu_replicas=2", "--set", "train.batch_size=33")
    assert code == 1 and "does not split evenly over 2 replicas" in err and "Traceback" not in err
    code, _, err = invoke_cli("train", "--set", f"artifacts.root={root}", "--set", "data.limit=50",
                              "--set", "train.cpu_replicas=2", "--set", "train.batch_size=64")
    assert code == 1 and "is more than the" in err and "lower train.batch_size" in err and "Traceback" not in err


class Crash(Exception):
    pass


@pytest.mark.parametrize("mode, extra", [
    ("fit", ["train.epochs=3", "train.lr_schedule.name=cosine", "train.lr_schedule.warmup_epochs=1",
             "train.early_stopping.enabled=true", "train.early_stopping.patience=1", "train.early_stopping.min_delta=10"]),
    *[(mode, ["train.epochs=2", "train.lr_schedule.name=plateau", "train.lr_schedule.patience=1",
              "train.lr_schedule.min_delta=10", "data.augment.translation=0.1", "data.augment.zoom=0.1",
              "train.class_weight=balanced"]) for mode in ("fit", "custom")],
])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, mode, extra):
    """Deterministic training stopped after epoch 1 and resumed gives bit-identical weights to a run that never
    stopped: the checkpoint carries model, optimizer and dropout RNG state (and the schedule's step, the plateau's
    and the early-stopping state), and epoch k's input order and augmentations are fixed. (The plain defaults are
    a subset of these options.)"""
    sets = ["data.limit=400", "train.batch_size=40", "train.deterministic=true", "train.cpu_replicas=2",
            f"train.mode={mode}", *extra]
    straight_cfg = make_config(tmp_path / "straight", *sets)
    dataset = ingest(straight_cfg.data, straight_cfg.artifacts.root)
    straight = train(straight_cfg, dataset)

    cfg = make_config(tmp_path / "resumed", *sets)
    dataset = ingest(cfg.data, cfg.artifacts.root)

    def crash_after_first_epoch(record):
        if record["epoch"] == 1:
            raise Crash()

    with pytest.raises(Crash):
        train(cfg, dataset, on_epoch=crash_after_first_epoch)
    assert not [p for p in (tmp_path / "resumed" / "train").iterdir() if not p.name.startswith(".")]
    resumed = train(cfg, dataset)
    assert resumed.resumed_from_epoch == 1 and straight.resumed_from_epoch == 0
    assert resumed.fingerprint == straight.fingerprint
    a = load_model(f"{straight.uri}/model.keras").get_weights()
    b = load_model(f"{resumed.uri}/model.keras").get_weights()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    history = json.load(open(f"{resumed.uri}/history.json"))["epochs"]
    straight_history = json.load(open(f"{straight.uri}/history.json"))["epochs"]
    rates = [h["learning_rate"] for h in history]
    assert rates == [h["learning_rate"] for h in straight_history] and len(set(rates)) == 2  # the schedule went on
    # patience 1 and min_delta 10: every epoch after the first is a plateau, so early stopping ends after epoch 2
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.parametrize("mode", ["fit", "custom"])
def test_sigterm_saves_a_checkpoint_mid_epoch_and_the_rerun_resumes(root, mode, caplog):
    """What Kubernetes and Prefect cancellation send: training stops before the next batch, saves a checkpoint in
    the middle of the epoch, exits within 30 s with one line; the same command resumes from that batch. The
    signal goes once the run's own debug line (-v) says epoch 2 has trained a tenth of its batches."""
    args = ["train", "--set", f"artifacts.root={root}", "--set", "data.limit=3000", "--set", "train.epochs=2",
            "--set", "train.batch_size=32", "--set", f"train.mode={mode}", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "-v", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:  # the process's own progress, line by line: no sleeping
            lines.append(line)
            if re.search(r"epoch 2/2: \d+ of 85 batches trained", line):  # 2,700 training images / 32
                proc.send_signal(signal.SIGTERM)
                sent = time.time()
                break
        assert proc.poll() is None, "".join(lines)[-2000:]
        out = proc.stdout.read()
        lines.extend(proc.stderr)
        proc.wait(timeout=60)
        assert time.time() - sent < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = "".join(lines)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"tfpipe: training stopped by SIGTERM in epoch 2/2 after (\d+) batches; checkpoint saved "
                        r"\(.*ckpt-2\): run the same command again to resume", last), last
    steps = int(re.search(r"after (\d+) batches", last).group(1))
    assert 8 <= steps < 85 and "Traceback" not in err and out == ""  # signalled at batch 8 (a tenth), before the end
    with caplog.at_level("INFO", logger="tfpipe"):
        code, out, err = invoke_cli(*args)  # the same command, in this process: nothing process-level left to see
    assert code == 0, err
    artifact = json.loads(out)
    assert artifact["resumed_from_epoch"] == 1 and f"and {steps} batches of epoch 2" in caplog.text
    history = json.load(open(f"{artifact['uri']}/history.json"))
    assert [h["epoch"] for h in history["epochs"]] == [1, 2]


@pytest.mark.parametrize("mode", ["fit", "custom"])
def test_a_stop_before_the_first_batch_of_a_resumed_epoch_keeps_its_batches(root, mode):
    """Resumed 3 batches into epoch 2 and stopped before the next batch: both styles save a checkpoint that
    records the 3 batches done (the real EpochRecorder), so the next run does not train them again."""
    import tensorflow as tf

    from tasks.errors import Stopped
    from tasks.train.checkpoints import EpochRecorder

    cfg = make_config(root, "data.limit=640", "train.batch_size=64", "train.epochs=2", f"train.mode={mode}")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    run = start_run(cfg, dataset, make_strategy(cfg.train), ("float32", "set by the test"), "test")
    recorder = EpochRecorder(run)
    run.stop.signal = signal.SIGTERM
    with pytest.raises(Stopped, match=r"in epoch 2/2 after 3 batches; checkpoint saved \(.*ckpt-2\)"):
        run_epochs(run, 1, 3, recorder)
    saved = tf.train.load_checkpoint(tf.train.latest_checkpoint(f"{run.work}/checkpoints"))
    assert saved.get_tensor("steps_into_epoch/.ATTRIBUTES/VARIABLE_VALUE") == 3
    assert recorder.history == []  # the unfinished epoch is not recorded


def test_published_model_loads_in_plain_keras_in_a_fresh_process(trained, tmp_path):
    """model.keras as a team ships it: default load_model arguments, a process that imports nothing of tfpipe,
    and classifies uint8 images as they come (the model scales them itself): as well as the evaluation found."""
    _, _, artifact = trained
    x, y = mnist_arrays("test", 500)
    np.save(tmp_path / "x.npy", x)
    script = (f"import sys, json, numpy as np, keras\n"
              f"model = keras.saving.load_model({artifact.uri + '/model.keras'!r})\n"
              f"y = model.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)\n"
              f"assert not [m for m in sys.modules if m.split('.')[0] in ('tasks', 'flows', 'pipeline_config')]\n"
              f"print(json.dumps(y.tolist()))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_model(f"{artifact.uri}/model.keras").predict(x, verbose=0)
    probs = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert (probs.argmax(1) == y).mean() > 0.3  # the gate's bar for this model: unscaled pixels would be chance


@pytest.mark.parametrize("mode", ["fit", "custom"])
@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_learning_rate_schedules_follow_their_formula_per_epoch(root, mode, schedule):
    import math

    sets = ["data.limit=300", "train.epochs=4", "train.batch_size=50", f"train.mode={mode}",
            "train.optimizer.learning_rate=0.01", f"train.lr_schedule.name={schedule}"]
    sets += (["train.lr_schedule.warmup_epochs=1", "train.lr_schedule.min_lr=0.001"] if schedule == "cosine"
             else ["train.lr_schedule.boundaries=[1, 3]", "train.lr_schedule.factor=0.5"])
    cfg = make_config(root, *sets)
    dataset = ingest(cfg.data, cfg.artifacts.root)
    artifact = train(cfg, dataset)
    steps = -(-dataset.counts["train"] // 50)
    rates = [h["learning_rate"] for h in json.load(open(f"{artifact.uri}/history.json"))["epochs"]]

    def expected(epoch: int) -> float:  # the rate of the first step after `epoch` epochs
        t = epoch * steps
        if schedule == "step":
            return 0.01 * 0.5 ** sum(epoch >= b for b in (1, 3))
        if t < steps:
            return 0.01 * t / steps
        progress = (t - steps) / (4 * steps - steps)
        return 0.001 + (0.01 - 0.001) * 0.5 * (1 + math.cos(math.pi * progress))

    assert rates == pytest.approx([expected(e) for e in range(1, 5)], rel=1e-4, abs=1e-7)


def test_label_smoothing_clipnorm_and_weight_decay_reach_the_optimizer_and_loss():
    from tasks.train.objectives import make_loss
    from tasks.train.optimization import make_optimizer

    cfg = make_config("/tmp/unused", "train.loss=categorical_crossentropy", "train.label_smoothing=0.1",
                      "train.optimizer.clipnorm=1.5", "train.optimizer.weight_decay=0.0001")
    optimizer = make_optimizer(cfg, "float32")
    assert isinstance(optimizer, keras.optimizers.AdamW) and optimizer.clipnorm == 1.5
    assert optimizer.weight_decay == pytest.approx(0.0001)
    loss = make_loss("categorical_crossentropy", label_smoothing=cfg.train.label_smoothing)
    # smoothed target for a confident correct prediction: the loss is no longer near 0
    assert float(loss(np.array([[0.0, 1.0]]), np.array([[1e-7, 1.0 - 1e-7]]))) > 0.3
    with pytest.raises(ConfigError, match="label_smoothing needs one-hot labels"):
        make_config("/tmp/unused", "train.label_smoothing=0.1")
    with pytest.raises(ConfigError, match="warmup_epochs=5 leaves no epoch"):
        make_config("/tmp/unused", "train.epochs=5", "train.lr_schedule.name=cosine", "train.lr_schedule.warmup_epochs=5")


@pytest.mark.parametrize("mode", ["fit", "custom"])
def test_early_stopping_stops_on_a_plateau_and_publishes_the_best_epoch(tmp_path, mode):
    """min_delta=1.0 makes every epoch after the first a plateau: with patience 2 training stops after epoch 3 and
    the published weights are epoch 1's (equal to a deterministic run of one epoch)."""
    sets = ["data.limit=300", "train.batch_size=50", "train.deterministic=true", f"train.mode={mode}",
            "train.lr_schedule.name=constant"]  # epoch 1 trains alike whatever train.epochs is
    stop = ["train.epochs=6", "train.early_stopping.enabled=true", "train.early_stopping.monitor=val_accuracy",
            "train.early_stopping.patience=2", "train.early_stopping.min_delta=1.0"]
    cfg = make_config(tmp_path / "stop", *sets, *stop)
    stopped = train(cfg, ingest(cfg.data, cfg.artifacts.root))
    history = json.load(open(f"{stopped.uri}/history.json"))
    assert [h["epoch"] for h in history["epochs"]] == [1, 2, 3]
    assert stopped.best_epoch == 1 and history["best_epoch"] == 1
    assert stopped.stop_reason.startswith("early stopping: val_accuracy did not improve by more than 1 for 2 epochs")
    one_cfg = make_config(tmp_path / "one", *sets, "train.epochs=1")
    one = train(one_cfg, ingest(one_cfg.data, one_cfg.artifacts.root))
    for a, b in zip(load_model(f"{stopped.uri}/model.keras").get_weights(),
                    load_model(f"{one.uri}/model.keras").get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="monitor a validation metric"):
        make_config(tmp_path, "train.early_stopping.monitor=loss")


@pytest.mark.parametrize("mode", ["fit", "custom"])
def test_plateau_schedule_drops_the_rate_when_the_monitor_stalls(root, mode):
    """min_delta=10 makes every epoch after the first a plateau: with patience 1 the rate drops by `factor` after
    each of them, down to min_lr."""
    cfg = make_config(root, "data.limit=300", "train.epochs=4", "train.batch_size=50", f"train.mode={mode}",
                      "train.optimizer.learning_rate=0.01", "train.lr_schedule.name=plateau",
                      "train.lr_schedule.patience=1", "train.lr_schedule.factor=0.5", "train.lr_schedule.min_delta=10",
                      "train.lr_schedule.min_lr=0.002")
    artifact = train(cfg, ingest(cfg.data, cfg.artifacts.root))
    rates = [h["learning_rate"] for h in json.load(open(f"{artifact.uri}/history.json"))["epochs"]]
    assert rates == pytest.approx([0.01, 0.005, 0.0025, 0.002], rel=1e-6)
    with pytest.raises(ConfigError, match="warmup_epochs is for the cosine schedule"):
        make_config(root, "train.lr_schedule.name=plateau", "train.lr_schedule.warmup_epochs=1")


def test_augmentation_changes_training_batches_only_and_repeats_with_the_seed(root):
    from tasks.train.setup import training_inputs

    sets = ["data.limit=256", "train.batch_size=32", "train.epochs=1"]
    plain_cfg = make_config(root, *sets)
    dataset = ingest(plain_cfg.data, plain_cfg.artifacts.root)
    cfg = make_config(root, *sets, "data.augment.translation=0.1", "data.augment.rotation=0.05",
                      "data.augment.zoom=0.1", "data.augment.contrast=0.2")
    strategy = make_strategy(cfg.train)
    plain_train, plain_val = training_inputs(plain_cfg, dataset, strategy)
    train_input, val = training_inputs(cfg, dataset, strategy)

    batches = [(x.numpy(), y.numpy()) for x, y in train_input(0)]
    plain = [(x.numpy(), y.numpy()) for x, y in plain_train(0)]
    for (x, y), (px, py) in zip(batches, plain, strict=True):
        np.testing.assert_array_equal(y, py)  # the same examples in the same order ...
        assert x.dtype == np.uint8 and np.abs(x.astype(int) - px).mean() > 2  # ... changed, still uint8 pixels
    # the same seed and epoch give the same batches; a resumed epoch (skip 3) continues with the same ones
    again = [x.numpy() for x, _ in train_input(0, 3)]
    for x, (expected, _) in zip(again, batches[3:], strict=True):
        np.testing.assert_array_equal(x, expected)
    assert np.abs(next(iter(train_input(1)))[0].numpy().astype(int) - batches[0][0]).mean() > 2  # another epoch
    for (x, y), (px, py) in zip(val, plain_val, strict=True):  # validation is never augmented
        np.testing.assert_array_equal(x.numpy(), px.numpy())


def test_augmentation_geometry():
    """One bright pixel: a translation moves it by at most translation * size; a flip mirrors about half of the
    batch; rotation and zoom keep it near the centre's distance rules; contrast keeps the mean of a flat image."""
    import tensorflow as tf

    from pipeline_config import AugmentConfig
    from tasks.data.augment import augment_batch

    images = np.zeros((64, 21, 21, 1), np.float32)
    images[:, 10, 14] = 1.0  # 4 px right of the centre
    seed = tf.constant([7, 0], tf.int64)

    def spots(cfg):
        cfg = AugmentConfig(**{"translation": 0, "rotation": 0, "zoom": 0, **cfg.model_dump(exclude_unset=True)})
        out = augment_batch(tf.constant(images), seed, cfg).numpy()[..., 0]
        return np.array([np.unravel_index(np.argmax(o), o.shape) for o in out])

    moved = spots(AugmentConfig(translation=0.2))
    assert np.abs(moved - [10, 14]).max() <= 0.2 * 21 + 1 and len({tuple(p) for p in moved}) > 10
    flipped = spots(AugmentConfig(flip=True))
    assert set(map(tuple, flipped)) == {(10, 14), (10, 6)} and 16 < (flipped[:, 1] == 6).sum() < 48
    turned = spots(AugmentConfig(rotation=0.25))  # up to 90 degrees: the distance from the centre stays ~4
    assert np.all(np.abs(np.hypot(turned[:, 0] - 10, turned[:, 1] - 10) - 4) <= 1.0)
    zoomed = spots(AugmentConfig(zoom=0.5))  # scale 0.5-1.5 about the centre: the pixel stays on its row
    assert np.all(zoomed[:, 0] == 10) and zoomed[:, 1].min() >= 12 and zoomed[:, 1].max() <= 19
    flat = np.full((8, 5, 5, 1), 0.5, np.float32)
    contrast_only = AugmentConfig(translation=0, rotation=0, zoom=0, contrast=0.5)
    np.testing.assert_allclose(augment_batch(tf.constant(flat), seed, contrast_only).numpy(), flat, atol=1e-6)


def test_class_weights_come_from_the_training_histogram(tmp_path):
    from tasks.errors import PipelineError
    from tasks.train.setup import class_weights, training_inputs

    x, y = mnist_arrays("train", 600)
    keep = (y != 3) | (np.arange(len(y)) % 4 == 0)  # class 3 four times rarer
    write_parquet_source(tmp_path / "src", (x[keep], y[keep]), mnist_arrays("test", 50))
    cfg = make_config(tmp_path / "root", f"data.source=parquet:{tmp_path / 'src'}", "train.class_weight=balanced",
                      "train.batch_size=64")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    labels = np.concatenate([b[1].numpy() for b in make_dataset(dataset, "train", 512)])
    counts = np.bincount(labels, minlength=10)
    weights = class_weights(cfg, dataset)
    assert weights == pytest.approx(list(len(labels) / (10 * counts)))
    assert weights[3] > 3 * weights[0]
    train_input, _ = training_inputs(cfg, dataset, make_strategy(cfg.train))
    for images, batch_labels, batch_weights in train_input(0):
        np.testing.assert_allclose(batch_weights.numpy(), np.array(weights, np.float32)[batch_labels.numpy()])
    manual = make_config(tmp_path / "root", "train.class_weight={3: 4.0}")
    assert class_weights(manual, dataset) == [1.0, 1.0, 1.0, 4.0] + [1.0] * 6
    with pytest.raises(PipelineError, match="names class 12, but the dataset has 10 classes"):
        class_weights(make_config(tmp_path / "root", "train.class_weight={12: 2.0}"), dataset)
    with pytest.raises(ConfigError, match="weights are > 0"):
        make_config(tmp_path / "root", "train.class_weight={3: 0}")


@pytest.mark.parametrize("mode", ["fit", "custom"])
def test_class_weights_scale_the_loss_and_leave_the_metrics_per_example(tmp_path, mode):
    """One meaning in both styles: with train.class_weight, the training accuracy, precision and recall count
    every example once (as val_accuracy and the test accuracy do). A learning rate of 1e-12 keeps the model as
    it started (no dropout, no augmentation), so the epoch's metrics are those of the published model on the
    training split, which the test computes; class 1 weighs 50, so the weighted figures would differ."""
    from tasks.train.objectives import MacroPrecisionRecall

    layers = "[{type: Flatten}, {type: Dense, units: 8, activation: relu}]"
    cfg = make_config(tmp_path, "data.limit=600", "train.epochs=1", "train.batch_size=50", f"train.mode={mode}",
                      "train.class_weight={1: 50.0}", "train.optimizer.learning_rate=1e-12", "train.precision=float32", f"model.layers={layers}",
                      *[s for s in PLAIN_TRAINING if "learning_rate" not in s])
    dataset = ingest(cfg.data, cfg.artifacts.root)
    history = json.load(open(f"{train(cfg, dataset).uri}/history.json"))["epochs"][0]
    model = load_model(f"{cfg.artifacts.root}/train/{os.listdir(f'{cfg.artifacts.root}/train')[0]}/model.keras")
    images, labels = zip(*make_dataset(dataset, "train", 600))
    labels = np.concatenate([l.numpy() for l in labels])
    guess = np.concatenate([model.predict(i, verbose=0) for i in images]).argmax(-1)
    right, weight = guess == labels, np.where(labels == 1, 50.0, 1.0)
    assert history["accuracy"] == pytest.approx(right.mean(), abs=1e-6)
    assert abs(right.mean() - (right * weight).sum() / weight.sum()) > 0.02  # the weighted figure is another one
    recall = np.mean([right[labels == c].mean() for c in np.unique(labels)])
    assert history["recall"] == pytest.approx(recall, abs=1e-5)
    # sample_weight, when a caller passes it, weights the macro metrics' counts
    metric = MacroPrecisionRecall(10, "recall")
    metric.update_state(labels, np.eye(10)[guess], sample_weight=weight)
    matrix = np.zeros((10, 10))
    np.add.at(matrix, (labels, guess), weight)
    np.testing.assert_allclose(metric.matrix.numpy(), matrix, rtol=1e-6)
