import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.errors import PipelineError
from tasks.evaluate.stage import evaluate
from tasks.model.published import load_model
from tasks.serve.predict import predict
from tests.conftest import MNIST, copy_of, invoke_cli, mnist_arrays, write_parquet_source


@pytest.fixture(scope="module")
def champion(trained, tmp_path_factory):
    """The session's tiny model in a copy of its root, evaluated there so the gate blesses it."""
    cfg, dataset, model = copy_of(trained, tmp_path_factory.mktemp("predict") / "artifacts")
    evaluation = evaluate(cfg, dataset, model)
    assert evaluation.blessed, evaluation.reasons
    return cfg, dataset, model, evaluation


def test_predictions_equal_model_predict_and_keep_row_order(champion, tmp_path):
    cfg, _, model, _ = champion
    cfg = cfg.model_copy(deep=True)  # the session's config stays as it is
    table = pq.read_table(MNIST / "test.parquet").slice(0, 700)
    src = tmp_path / "in.parquet"
    pq.write_table(table, src, row_group_size=128)
    out = tmp_path / "out" / "preds.parquet"
    cfg.predict.batch_size = 100  # several chunks, the last one partial
    artifact = predict(cfg, "champion", str(src), str(out))
    assert artifact.rows == 700 and artifact.model_fingerprint == model.fingerprint
    result = pq.read_table(out)
    assert result.column("row_id").to_pylist() == list(range(700))
    x, _ = mnist_arrays("test", 700)
    expected = load_model(f"{model.uri}/model.keras").predict(x, verbose=0)  # uint8 pixels, as they are stored
    probs = np.array(result.column("probabilities").to_pylist(), np.float32)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_array_equal(result.column("predicted_label").to_numpy(), expected.argmax(1))
    np.testing.assert_allclose(result.column("confidence").to_numpy(), expected.max(1), atol=1e-5)
    assert result.column("predicted_name").to_pylist()[:5] == [str(i) for i in expected.argmax(1)[:5]]
    meta = result.schema.metadata
    assert meta[b"model_fingerprint"].decode() == model.fingerprint
    assert result.schema.field("probabilities").type == pa.list_(pa.float32())
    assert sorted(p.name for p in out.parent.iterdir()) == ["preds.drift.json", "preds.parquet"]  # no temporary file


def test_a_relative_folder_of_image_files_by_any_name(champion, tmp_path, monkeypatch, caplog):
    """`tfpipe predict --input incoming/` as the README writes it: a folder relative to where the command runs,
    whose images are told by their content (a PNG with no extension is one, a text file is not)."""
    from PIL import Image

    cfg, _, model, _ = champion
    x, _ = mnist_arrays("test", 3)
    (tmp_path / "incoming").mkdir()
    for name, pixels in zip(("0001.png", "0002", "0003.jfif"), x):
        Image.fromarray(pixels[..., 0]).save(tmp_path / "incoming" / name, format="JPEG" if "jfif" in name else "PNG")
    (tmp_path / "incoming" / "README.txt").write_text("scans from the front desk")
    monkeypatch.chdir(tmp_path)
    code, stdout, err = invoke_cli("predict", "--set", f"artifacts.root={cfg.artifacts.root}", "--input", "incoming/",
                                   "--output", "scored.parquet")
    assert code == 0, err
    assert stdout.startswith("3 predictions by model") and "left out (the first: README.txt)" in caplog.text
    table = pq.read_table(tmp_path / "scored.parquet")
    assert table.column("path").to_pylist() == ["0001.png", "0002", "0003.jfif"]
    expected = load_model(f"{model.uri}/model.keras").predict(x[:2], verbose=0)  # the lossless two, exactly
    np.testing.assert_allclose(np.array(table.column("probabilities").to_pylist()[:2]), expected, atol=1e-5)


def test_champion_accuracy_on_the_test_rows_equals_the_evaluation(champion, tmp_path):
    cfg, dataset, _, evaluation = champion
    n = dataset.counts["test"]
    src = tmp_path / "test.parquet"
    pq.write_table(pq.read_table(MNIST / "test.parquet").slice(0, n), src)
    out = tmp_path / "preds.parquet"
    code, stdout, err = invoke_cli("predict", "--set", f"artifacts.root={cfg.artifacts.root}", "--model", "champion",
                                   "--input", str(src), "--output", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["rows"] == n
    predicted = pq.read_table(out).column("predicted_label").to_numpy()
    labels = pq.read_table(src).column("label").to_numpy()
    assert (predicted == labels).mean() == pytest.approx(evaluation.metrics["accuracy"], abs=1e-12)


def test_key_columns_npz_and_cache_inputs(champion, tmp_path):
    cfg, dataset, model, _ = champion
    cfg = cfg.model_copy(deep=True)  # the session's config stays as it is
    x, y = mnist_arrays("test", 50)
    src = tmp_path / "keyed.parquet"
    pq.write_table(pa.table({"image": pa.array([r.tobytes() for r in x.reshape(50, -1)], pa.binary(784)),
                             "sample_id": pa.array([f"s{i}" for i in range(50)])}), src)
    cfg.predict.key_columns = ["sample_id"]
    out = tmp_path / "keyed-out.parquet"
    predict(cfg, model.fingerprint[:16], str(src), str(out))
    result = pq.read_table(out)
    assert result.column_names[0] == "sample_id" and result.column("sample_id").to_pylist() == [f"s{i}" for i in range(50)]
    cfg.predict.key_columns = []
    npz = tmp_path / "x.npz"
    np.savez(npz, x=x[:, :, :, 0])
    from_npz = pq.read_table(predict(cfg, model.uri, str(npz), str(tmp_path / "npz.parquet")).output)
    np.testing.assert_array_equal(from_npz.column("predicted_label").to_numpy(),
                                  result.column("predicted_label").to_numpy())

    cached = predict(cfg, "champion", f"cache:{dataset.fingerprint}/test", str(tmp_path / "cache.parquet"))
    assert cached.rows == dataset.counts["test"]
    assert pq.read_table(cached.output).column("predicted_label").to_numpy()[:50].tolist() == \
        from_npz.column("predicted_label").to_numpy().tolist()  # the test split keeps source order


def test_unblessed_model_is_refused_unless_allowed(champion, tmp_path):
    from tasks.train.stage import train
    from tests.conftest import make_config

    cfg, dataset, _, _ = champion
    other_cfg = make_config(cfg.artifacts.root, "data.limit=1200", "train.epochs=1", "train.batch_size=64")
    other = train(other_cfg, dataset)
    out = tmp_path / "p.parquet"
    with pytest.raises(PipelineError, match="was not blessed .* --allow-unblessed"):
        predict(cfg, other.uri, str(MNIST / "test.parquet"), str(out))
    assert not out.exists()
    assert predict(cfg, other.uri, str(MNIST / "test.parquet"), str(out), allow_unblessed=True).rows == 10000


def bad_predict(cfg, tmp_path, input_path, match):
    out = tmp_path / "outdir" / "bad.parquet"
    code, stdout, err = invoke_cli("predict", "--set", f"artifacts.root={cfg.artifacts.root}", "--model", "champion",
                                   "--input", str(input_path), "--output", str(out))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists() and not (tmp_path / "outdir").exists()


def test_bad_inputs_leave_no_output(champion, tmp_path):
    cfg = champion[0]
    x, y = mnist_arrays("test", 10)
    no_column = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"pixels": pa.array([r.tobytes() for r in x.reshape(10, -1)])}), no_column)
    bad_predict(cfg, tmp_path, no_column, "no column 'image'")

    wrong_pixels = tmp_path / "pixels.parquet"
    pq.write_table(pa.table({"image": pa.array([b"\x01" * 700] * 10)}), wrong_pixels)
    bad_predict(cfg, tmp_path, wrong_pixels, "700 values but the image shape")

    rgb = write_parquet_source(tmp_path / "rgb", (np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64)),
                               (np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64)),
                               metadata={"image_shape": "[16, 16, 3]"})
    bad_predict(cfg, tmp_path, rgb / "test.parquet", r"images are \[16, 16, 1\] but the model expects \[28, 28, 1\]")

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"image": pa.array([], pa.binary(784))}), empty)
    bad_predict(cfg, tmp_path, empty, "has no rows")

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    bad_predict(cfg, tmp_path, garbage, "not a readable Parquet file")

    bad_predict(cfg, tmp_path, tmp_path / "missing.parquet", "does not exist")


def test_cli_predict_by_fingerprint_prefix_unblessed_in_float32(champion, tmp_path):
    from tasks.model.precision import with_dtype_policy
    from tasks.train.stage import train
    from tests.conftest import make_config

    cfg, dataset, _, _ = champion
    other = train(make_config(cfg.artifacts.root, "data.limit=1200", "train.epochs=1", "train.batch_size=128"), dataset)
    src = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(MNIST / "test.parquet").slice(0, 64), src)
    out = tmp_path / "out.parquet"
    args = ["predict", "--set", f"artifacts.root={cfg.artifacts.root}", "--model", other.fingerprint[:10],
            "--input", str(src), "--output", str(out), "--set", "predict.precision=float32"]
    code, _, err = invoke_cli(*args)
    assert code == 1 and "was not blessed" in err and not out.exists()
    code, stdout, err = invoke_cli(*args, "--allow-unblessed", "--json")
    assert code == 0, err
    assert json.loads(stdout)["model_fingerprint"] == other.fingerprint
    x, _ = mnist_arrays("test", 64)
    f32 = with_dtype_policy(load_model(f"{other.uri}/model.keras"), "float32")
    assert f32.layers[1].compute_dtype == "float32"
    expected = f32.predict(x, verbose=0)
    probs = np.array(pq.read_table(out).column("probabilities").to_pylist(), np.float32)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_a_model_with_python_code_is_refused_in_one_line(champion, tmp_path):
    import shutil

    import keras

    cfg, _, model, _ = champion
    untrusted = tmp_path / "untrusted"
    shutil.copytree(model.uri, untrusted)  # a published model directory whose model.keras was swapped
    inputs = keras.Input((28, 28, 1))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(keras.layers.Lambda(lambda x: x * 2)(inputs)))
    keras.Model(inputs, outputs).save(untrusted / "model.keras")
    out = tmp_path / "p.parquet"
    code, _, err = invoke_cli("predict", "--set", f"artifacts.root={cfg.artifacts.root}", "--model", str(untrusted),
                              "--allow-unblessed", "--input", str(MNIST / "test.parquet"), "--output", str(out))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"tfpipe: error: {untrusted}/model.keras contains Python code (a Lambda layer or a "
                               "custom function), and tfpipe loads models only in Keras safe mode")
    assert not out.exists()


def test_predict_removes_temporary_files_of_killed_runs_only(champion, tmp_path):
    import os

    cfg = champion[0]
    out = tmp_path / "preds.parquet"
    dead = tmp_path / f".{out.name}.tmp-{2 ** 22 + 12345}-deadbeef"  # above the kernel's pid_max: no such process
    alive = tmp_path / f".{out.name}.tmp-{os.getpid()}-cafecafe"  # a run that is still writing
    dead.write_bytes(b"partial")
    alive.write_bytes(b"partial")
    src = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(MNIST / "test.parquet").slice(0, 10), src)
    assert predict(cfg, "champion", str(src), str(out)).rows == 10
    assert not dead.exists() and alive.exists()


def test_no_silent_overwrite(champion, tmp_path):
    """An existing output: refused; replaced with --overwrite when tfpipe wrote it; a foreign file never."""
    cfg, _, _, _ = champion
    args = ["predict", "--input", str(MNIST / "test.parquet"), "--set", f"artifacts.root={cfg.artifacts.root}",
            "--set", "predict.batch_size=2048"]
    out = tmp_path / "preds.parquet"
    assert invoke_cli(*args, "--output", str(out))[0] == 0
    written = out.stat().st_mtime_ns
    code, _, err = invoke_cli(*args, "--output", str(out))
    assert code == 1 and err == f"tfpipe: error: --output {out} already exists: pass --overwrite to replace it (only a file tfpipe wrote is replaced)\n"
    assert out.stat().st_mtime_ns == written
    code, _, err = invoke_cli(*args, "--output", str(out), "--overwrite")
    assert code == 0, err
    assert out.stat().st_mtime_ns != written and pq.read_table(out).num_rows == 10000
    assert pq.read_schema(out).metadata[b"written_by"] == b"tfpipe"

    for foreign in (tmp_path / "notes.txt", tmp_path / "theirs.parquet"):
        if foreign.suffix == ".txt":
            foreign.write_text("a text file the user cares about\n")
        else:
            pq.write_table(pa.table({"x": [1, 2]}), foreign)
        before = foreign.read_bytes()
        code, _, err = invoke_cli(*args, "--output", str(foreign), "--overwrite")
        assert code == 1 and f"--output {foreign} exists and was not written by tfpipe" in err
        assert foreign.read_bytes() == before


def test_a_model_published_before_models_scaled_their_input_still_predicts_and_evaluates(trained, tmp_path):
    """Models published before took [0, 1] floats (their manifests have no input_pixels): a copy of the session's
    model rebuilt that way (its Rescaling layer taken out, the weights kept) gives the same probabilities and the
    same test accuracy, prediction and evaluation scaling its input for it."""
    import keras

    from tasks.evaluate.stage import evaluate
    from tasks.store.publish import MANIFEST
    from tasks.store.storage import read_json, write_json

    cfg, dataset, model = copy_of(trained, tmp_path / "artifacts")
    current = load_model(f"{model.uri}/model.keras")
    inputs = keras.Input(current.input_shape[1:], name="image")  # float32, as models were
    x = inputs
    for layer in current.layers[2:]:  # after the input and its Rescaling
        x = layer(x)
    legacy = keras.Model(inputs, x, name=current.name)
    legacy.save(f"{model.uri}/model.keras")
    manifest = read_json(f"{model.uri}/{MANIFEST}")
    manifest.pop("input_pixels")
    write_json(f"{model.uri}/{MANIFEST}", manifest)

    # The same model scaled outside: equal but for where the bf16 rounding of the scaling falls (the session's
    # model trains in the machine's precision, bf16 here).
    x_test, _ = mnist_arrays("test", 300)
    expected = current.predict(x_test, verbose=0)
    np.testing.assert_allclose(legacy.predict(x_test.astype(np.float32) / 255.0, verbose=0), expected, atol=0.02)
    out = tmp_path / "legacy.parquet"
    predict(cfg, model.uri, str(MNIST / "test.parquet"), str(out), allow_unblessed=True)
    probs = np.array(pq.read_table(out).column("probabilities").to_pylist()[:300], np.float32)
    np.testing.assert_allclose(probs, expected, atol=0.02)  # scaled for it: unscaled pixels would be far off
    assert (probs.argmax(1) == expected.argmax(1)).mean() >= 0.98
    scaled_outside = evaluate(cfg, dataset, model.model_copy(update={"input_pixels": None}))
    fresh_cfg, fresh_dataset, fresh_model = copy_of(trained, tmp_path / "fresh")
    fresh = evaluate(fresh_cfg, fresh_dataset, fresh_model)
    assert abs(scaled_outside.metrics["accuracy"] - fresh.metrics["accuracy"]) <= 0.01
    # and its serving formats: the SavedModel's signatures take uint8 and scale for it; TFLite and ONNX keep its
    # float input, and the parity check feeds them scaled images
    from tasks.serve.export import export_published

    exports = export_published(cfg, model.uri, ["saved_model", "tflite", "onnx"])["exports"]
    assert all(entry["parity"]["label_agreement"] >= 0.999 for entry in exports.values()), exports
