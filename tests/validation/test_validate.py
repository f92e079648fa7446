"""The validate stage: statistics computed at ingest, checked against the schema and the champion's data; leakage
fails by default, the other anomalies warn and can block the gate."""

import json

import numpy as np
import pytest
import yaml

from tasks.errors import PipelineError
from tasks.validation.statistics import histogram_js, psi
from tests.conftest import PLAIN_TRAINING, make_config, mnist_arrays, write_parquet_source


def ingest_source(root, source, *overrides):
    from tasks.data.ingest import ingest

    cfg = make_config(root, f"data.source=parquet:{source}", "data.image_shape=[28,28,1]", *overrides)
    return cfg, ingest(cfg.data, cfg.artifacts.root)


def statistics_of(dataset) -> dict:
    with open(f"{dataset.uri}/statistics.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def mnist_parts():
    return mnist_arrays("train", 1500), mnist_arrays("test", 500)


def test_a_clean_dataset_passes_and_its_statistics_are_the_data_s(tmp_path, mnist_parts):
    from tasks.validation.validate import validate

    (x, y), test = mnist_parts
    source = write_parquet_source(tmp_path / "src", (x, y), test)
    cfg, dataset = ingest_source(tmp_path / "artifacts", source)
    stats = statistics_of(dataset)
    train, validation = stats["splits"]["train"], stats["splits"]["validation"]
    assert train["count"] + validation["count"] == 1500 and stats["splits"]["test"]["count"] == 500
    both = np.asarray(train["class_histogram"]) + np.asarray(validation["class_histogram"])
    assert both.tolist() == np.bincount(y, minlength=10).tolist()
    assert stats["splits"]["test"]["channel_mean"][0] == pytest.approx(test[0].mean(), abs=1e-3)
    assert stats["splits"]["test"]["channel_std"][0] == pytest.approx(test[0].std(), abs=1e-3)
    assert stats["leakage"] == {"train/validation": 0, "train/test": 0, "validation/test": 0}
    result = validate(cfg, dataset)
    assert result.anomalies == [] and "inferred from this dataset" in result.schema_source
    schema = yaml.safe_load(open(f"{result.uri}/{result.schema_path}"))
    assert schema["image_shape"] == [28, 28, 1] and schema["num_classes"] == 10
    assert validate(cfg, dataset).cache_hit


def test_images_shared_by_train_and_test_fail_the_stage_and_publish_nothing(tmp_path, mnist_parts):
    from tasks.validation.validate import validate

    (x, y), (tx, ty) = mnist_parts
    leaked = (np.concatenate([tx, x[:7]]), np.concatenate([ty, y[:7]]))  # 7 training images in the test split too
    cfg, dataset = ingest_source(tmp_path / "artifacts", write_parquet_source(tmp_path / "src", (x, y), leaked))
    assert sum(statistics_of(dataset)["leakage"][pair] for pair in ("train/test", "validation/test")) == 7
    with pytest.raises(PipelineError, match=r"data validation failed: \d images are in both (train|validation) and "
                                            r"test .*validate.on_anomaly.<kind>=warn lets a run go on"):
        validate(cfg, dataset)
    assert not (tmp_path / "artifacts" / "validate").exists() or not [
        p for p in (tmp_path / "artifacts" / "validate").iterdir() if not p.name.startswith(".")]
    warned = cfg.model_copy(deep=True)
    warned.validate.on_anomaly = {**warned.validate.on_anomaly, "leakage": "warn"}
    result = validate(warned, dataset)
    assert {a["kind"] for a in result.anomalies} == {"leakage"} and all(a["action"] == "warn" for a in result.anomalies)


def test_changes_from_the_champion_s_data_are_each_found_and_named_with_their_figure(tmp_path, mnist_parts):
    from tasks.evaluate.stage import evaluate
    from tasks.train.stage import train
    from tasks.validation.validate import validate

    (x, y), (tx, ty) = mnist_parts
    root = tmp_path / "artifacts"
    cfg, dataset = ingest_source(root, write_parquet_source(tmp_path / "a", (x, y), (tx, ty)), "train.epochs=1",
                                 "evaluate.min_accuracy=0.05", *PLAIN_TRAINING)
    evaluation = evaluate(cfg, dataset, train(cfg, dataset))  # the champion, trained on the first dataset
    assert evaluation.blessed

    def anomalies(name, train_part, test_part):
        cfg, changed = ingest_source(root, write_parquet_source(tmp_path / name, train_part, test_part))
        result = validate(cfg, changed)
        assert result.reference_fingerprint == dataset.fingerprint
        return {(a["kind"], a["name"]): a for a in result.anomalies}

    keep = y != 3  # class 3 gone from training
    found = anomalies("no-three", (x[keep], y[keep]), (tx, ty))
    assert found[("schema", "class 3")]["message"].startswith("class 3 has 0 training images, the schema wants at least")
    assert ("drift", "train class proportions") in found

    shifted = (y < 5) | (np.arange(len(y)) % 5 == 0)  # classes 5-9 down to a fifth
    found = anomalies("shifted", (x[shifted], y[shifted]), (tx, ty))
    drift = found[("drift", "train class proportions")]
    assert drift["value"] > 0.1 and "Jensen-Shannon distance" in drift["message"]
    assert ("schema", "class 3") not in found

    dark = (x * 0.4).astype(np.uint8), y  # images darkened
    found = anomalies("dark", dark, ((tx * 0.4).astype(np.uint8), ty))
    assert "mean brightness" in found[("schema", "brightness_mean")]["message"]
    assert {("drift", f"{split} brightness") for split in ("train", "validation", "test")} <= set(found)
    assert ("drift", "train class proportions") not in found


def test_statistics_memory_stays_flat_however_long_the_stream():
    """Streaming 16x the images grows the statistics' peak memory by their 8-byte hashes only (what duplicates and
    leakage need), and a big batch is measured in chunks, never copied to floats whole."""
    import tracemalloc

    from tasks.validation.statistics import ImageStatistics

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2048, 28, 28, 1), np.uint8)  # 1.6 MB, as ingest hands over a batch
    labels = rng.integers(0, 10, len(batch))

    def peak(batches: int) -> int:
        stats = ImageStatistics()
        tracemalloc.start()
        for _ in range(batches):
            stats.update(batch, labels)
        assert stats.summary(10)["count"] == batches * len(batch)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    small, large = peak(4), peak(64)  # 6 MB and 100 MB of images streamed
    hashes = 8 * 64 * len(batch)
    assert large - small < 4 * hashes, (small, large)  # the hashes, with the sorted copy that counts duplicates
    assert large < 4 * hashes + batch.nbytes, large  # a float32 copy of the batch alone would be 6.4 MB


def test_distances_are_zero_for_equal_histograms_and_grow_with_the_shift():
    base = [10, 20, 30, 40]
    assert histogram_js(base, [2 * v for v in base]) == pytest.approx(0) and psi(base, base) == pytest.approx(0)
    near, far = [12, 20, 30, 38], [40, 30, 20, 10]
    assert 0 < histogram_js(base, near) < histogram_js(base, far) <= 1
    assert 0 < psi(base, near) < psi(base, far)


def test_a_run_warned_of_leakage_goes_on_with_the_anomalies_in_its_report_and_the_gate_can_refuse(
        prefect_server, tmp_path, mnist_parts):
    from flows.training import training_pipeline
    from tests.flows.test_flows import run_artifacts

    (x, y), (tx, ty) = mnist_parts
    source = write_parquet_source(tmp_path / "src", (x, y), (np.concatenate([tx, x[:5]]), np.concatenate([ty, y[:5]])))
    overrides = {"artifacts.root": str(tmp_path / "artifacts"), "data.source": f"parquet:{source}",
                 "data.image_shape": [28, 28, 1], "train.epochs": 1, "evaluate.min_accuracy": 0.05,
                 "validate.on_anomaly.leakage": "warn", "evaluate.block_on_anomalies": True,
                 **{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in PLAIN_TRAINING)}}
    state = training_pipeline(overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert {a["kind"] for a in summary.validation.anomalies} == {"leakage"}
    refused = [r for r in summary.evaluation.reasons if r.check == "block_on_anomalies"]
    assert not summary.evaluation.blessed and refused and refused[0].observed >= 1 and not refused[0].passed
    artifacts = run_artifacts(state.state_details.flow_run_id)
    assert "images are in both" in artifacts["training-report"].data
    markdown = artifacts["data-validation"].data
    assert "| leakage |" in markdown and "| warn |" in markdown
    sparklines = [line for line in markdown.splitlines() if line.startswith("  - train: `")]  # the inline plot
    assert len(sparklines) == 1 and "█" in sparklines[0] and len(sparklines[0].split("`")[1]) == 32
    rows = json.loads(artifacts["data-statistics"].data)
    assert sum(r.get("in train/test", 0) + r.get("in validation/test", 0) for r in rows) == 5


def test_prediction_reports_drift_on_darkened_inputs_and_none_on_inputs_like_the_training_data(trained, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.evaluate.stage import evaluate
    from tasks.serve.predict import predict
    from tests.conftest import copy_of

    cfg, dataset, model = copy_of(trained, tmp_path / "artifacts")
    evaluate(cfg, dataset, model)  # the model's answers on its test split: the reference for its answers later

    x, _ = mnist_arrays("test", 3000)
    fresh, dark = x[2000:], (x[2000:] * 0.4).astype(np.uint8)  # images it never saw, as they come and darkened
    paths = {}
    for name, images in (("fresh", fresh), ("dark", dark)):
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"image": pa.array([r.tobytes() for r in images.reshape(len(images), -1)],
                                                   pa.binary(784))}), paths[name])
    like = predict(cfg, model.fingerprint, str(paths["fresh"]), str(tmp_path / "out" / "fresh.parquet"),
                   allow_unblessed=True)
    report = json.loads(open(like.drift_path).read())
    assert like.drift is False and report["drift"] is False and report["images"] == 1000
    assert all(f["js_distance"] <= f["max_js_distance"] for f in report["figures"].values()), report["figures"]

    with caplog.at_level("WARNING", logger="tfpipe.predict"):
        darkened = predict(cfg, model.fingerprint, str(paths["dark"]), str(tmp_path / "out" / "dark.parquet"),
                           allow_unblessed=True)
    report = json.loads(open(darkened.drift_path).read())
    assert darkened.drift is True and report["figures"]["brightness_histogram"]["drift"]
    assert report["figures"]["brightness_histogram"]["js_distance"] > 0.5
    assert "drifted from model" in caplog.text and "brightness_histogram (JS" in caplog.text

    strict = cfg.model_copy(deep=True)
    strict.predict.on_drift = "fail"
    with pytest.raises(PipelineError, match="drifted from model .* nothing was published"):
        predict(strict, model.fingerprint, str(paths["dark"]), str(tmp_path / "strict" / "dark.parquet"),
                allow_unblessed=True)
    assert not (tmp_path / "strict").exists()
