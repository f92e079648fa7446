import json
import os

import numpy as np
import pytest

from tasks.data.ingest import ingest
from tasks.errors import PipelineError
from tasks.evaluate.gate import gate
from tasks.evaluate.metrics import classification_metrics
from tasks.evaluate.stage import evaluate
from tasks.registry.champion import CHAMPION_FILE, read_champion
from tasks.train.stage import train
from tests.conftest import PLAIN_TRAINING, copy_of, invoke_cli, make_config


def test_metrics_on_a_case_known_by_hand():
    # 3 classes, 6 examples. true: 0 0 1 1 2 2 ; predicted: 0 1 1 1 2 0
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), predicted] = 0.8
    m = classification_metrics(labels, probs, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision: a 1/2, b 2/3, c 1/1 ; recall: a 1/2, b 2/2, c 1/2
    assert [c["precision"] for c in m["per_class"]] == pytest.approx([0.5, 2 / 3, 1.0])
    assert [c["recall"] for c in m["per_class"]] == pytest.approx([0.5, 1.0, 0.5])
    assert [c["support"] for c in m["per_class"]] == [2, 2, 2]
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    # loss: the true class got 0.8 four times and 0.1 twice
    assert m["loss"] == pytest.approx(-(4 * np.log(0.8) + 2 * np.log(0.1)) / 6)


def test_gate_thresholds_and_regression():
    cfg = make_config("/tmp/unused", "evaluate.min_accuracy=0.9", "evaluate.max_regression=0.01").evaluate
    ok, reasons = gate({"accuracy": 0.95, "macro_f1": 0.9}, cfg, None)
    assert ok and [r.check for r in reasons] == ["min_accuracy", "min_macro_f1"]
    ok, reasons = gate({"accuracy": 0.95, "macro_f1": 0.9}, cfg, 0.97)
    last = reasons[-1]
    assert not ok and (last.check, last.metric, last.observed, last.passed) == ("max_regression", "accuracy", 0.95, False)
    assert last.threshold == pytest.approx(0.96)
    ok, _ = gate({"accuracy": 0.965, "macro_f1": 0.9}, cfg, 0.97)
    assert ok
    ok, reasons = gate({"accuracy": 0.85, "macro_f1": 0.9}, cfg, None)
    assert not ok and not reasons[0].passed and reasons[0].observed == 0.85


def test_gate_blesses_first_refuses_worse_accepts_better(tmp_path):
    root = tmp_path / "artifacts"
    base = ["data.limit=600", "train.batch_size=64", "evaluate.min_accuracy=0.3", "evaluate.max_regression=0.0",
            "train.deterministic=true", *PLAIN_TRAINING]  # the same numbers on every run: 4 epochs beat 2 every time
    cfg = make_config(root, *base, "train.epochs=2")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    first = evaluate(cfg, dataset, train(cfg, dataset))
    assert first.blessed and first.champion_before is None and first.champion_after == first.model_fingerprint
    assert [r.check for r in first.reasons] == ["min_accuracy", "min_macro_f1"]  # thresholds only
    assert os.path.exists(f"{first.uri}/metrics.json") and os.path.exists(f"{first.uri}/confusion_matrix.png")
    assert os.path.exists(f"{first.uri}/training_curves.png")

    # a worse challenger: a learning rate so small it barely moves from random
    worse_cfg = make_config(root, *base, "train.epochs=1", "train.optimizer.learning_rate=0.000001")
    worse = evaluate(worse_cfg, dataset, train(worse_cfg, dataset))
    assert not worse.blessed
    regression = [r for r in worse.reasons if r.check == "max_regression"][0]
    assert not regression.passed and regression.threshold == pytest.approx(first.metrics["accuracy"])
    assert read_champion(str(root))["current"]["model_fingerprint"] == first.model_fingerprint

    better_cfg = make_config(root, *base, "train.epochs=4")
    better = evaluate(better_cfg, dataset, train(better_cfg, dataset))
    assert better.metrics["accuracy"] > first.metrics["accuracy"]
    assert better.blessed and better.champion_before == first.model_fingerprint
    champion = json.load(open(root / CHAMPION_FILE))
    assert champion["current"]["model_fingerprint"] == better.model_fingerprint
    assert [h["model_fingerprint"] for h in champion["history"]] == [first.model_fingerprint]


def test_model_and_data_must_match(tmp_path, trained):
    cfg, _, model = copy_of(trained, tmp_path / "artifacts")
    rng = np.random.default_rng(0)
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 20),
             x_test=rng.integers(0, 255, (10, 16, 16, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 10))
    other = make_config(cfg.artifacts.root, f"data.source=npz:{path}")
    dataset = ingest(other.data, other.artifacts.root)
    with pytest.raises(PipelineError, match=r"expects images of shape \[28, 28, 1\] but the dataset .* has \[16, 16, 3\]"):
        evaluate(other, dataset, model)


def test_cli_evaluate_json(tmp_path):
    args = ["--set", f"artifacts.root={tmp_path}/a", "--set", "data.limit=300", "--set", "train.epochs=1",
            "--set", "evaluate.min_accuracy=0.99"]
    code, out, err = invoke_cli("evaluate", *args, "--json")
    assert code == 0, err
    evaluation = json.loads(out)
    assert evaluation["blessed"] is False and evaluation["champion_after"] is None
    assert evaluation["reasons"][0]["check"] == "min_accuracy" and evaluation["reasons"][0]["passed"] is False
    assert evaluation["metrics"]["count"] == 300


def test_champion_is_re_measured_on_a_different_test_split(tmp_path):
    from tasks.model.published import load_model
    from tests.conftest import mnist_arrays

    root = tmp_path / "artifacts"
    base = ["train.batch_size=64", "evaluate.min_accuracy=0.3", "evaluate.max_regression=0.0", "train.epochs=2",
            *PLAIN_TRAINING]
    cfg = make_config(root, "data.limit=600", *base)
    dataset = ingest(cfg.data, cfg.artifacts.root)
    champion = evaluate(cfg, dataset, train(cfg, dataset))
    assert champion.blessed

    other_cfg = make_config(root, "data.limit=400", *base, "train.epochs=1")  # another dataset: other test rows
    other = ingest(other_cfg.data, other_cfg.artifacts.root)
    assert other.fingerprint != dataset.fingerprint
    challenger = evaluate(other_cfg, other, train(other_cfg, other))
    manifest = json.load(open(f"{challenger.uri}/manifest.json"))
    assert manifest["compared_with"] == f"champion {champion.model_fingerprint[:12]} re-measured"
    x, y = mnist_arrays("test", 400)
    probs = load_model(f"{root}/train/{champion.model_fingerprint}/model.keras").predict(x, verbose=0)
    regression = [r for r in challenger.reasons if r.check == "max_regression"][0]
    assert regression.threshold == pytest.approx(float((probs.argmax(1) == y).mean()))
    assert regression.passed == (challenger.metrics["accuracy"] >= regression.threshold)


def test_failing_min_macro_f1_refuses_the_model(trained, tmp_path):
    cfg, dataset, model = copy_of(trained, tmp_path / "artifacts")
    strict = make_config(cfg.artifacts.root, "data.limit=1200", "train.epochs=2", "train.batch_size=64",
                         "evaluate.min_accuracy=0.0", "evaluate.min_macro_f1=0.999")
    evaluation = evaluate(strict, dataset, model)
    assert not evaluation.blessed
    failed = [r for r in evaluation.reasons if not r.passed]
    assert [(r.check, r.metric) for r in failed] == [("min_macro_f1", "macro_f1")]
    assert failed[0].observed == pytest.approx(evaluation.metrics["macro_f1"]) and failed[0].threshold == 0.999
