"""Models ready to serve: the SavedModel's two signatures, TFLite and ONNX checked against Keras before publishing,
`tfpipe export` for published models, and the model card."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tasks.errors import PipelineError
from tests.conftest import PLAIN_TRAINING, copy_of, invoke_cli, make_config, mnist_arrays

SERVED = ["data.limit=1200", "train.epochs=2", "train.batch_size=64", "data.image_size=[32,32]", "data.resize=pad",
          "evaluate.min_accuracy=0.3", *PLAIN_TRAINING]


def trained_model(root, *overrides):
    from tasks.data.ingest import ingest
    from tasks.train.stage import train

    cfg = make_config(root, *SERVED, *overrides)
    dataset = ingest(cfg.data, cfg.artifacts.root)
    return cfg, dataset, train(cfg, dataset)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A float32 model of MNIST resized (padded) to 32x32 at ingest, published with every format."""
    root = tmp_path_factory.mktemp("served") / "artifacts"
    return trained_model(root, "train.precision=float32", "export.formats=[saved_model,tflite,onnx]")


def keras_float32(model_artifact, images: np.ndarray) -> np.ndarray:
    from tasks.model.precision import with_dtype_policy
    from tasks.model.published import load_model

    model = with_dtype_policy(load_model(f"{model_artifact.uri}/model.keras"), "float32")
    return model.predict(images, verbose=0)


def test_serve_bytes_runs_the_function_ingest_runs_for_every_resize_filter_and_colour_mode():
    """The graph function the SavedModel traces (tasks/preprocess/graph.py `pixels`) against ingest's pipeline of
    it (tf.data over many files), for PNG and JPEG files of several sizes, every resize mode and filter, both
    colour modes: the same pixels, exactly. (The SavedModel itself, in a process of its own, on a phone's and a
    camera's files: tests/preprocess/test_one_preprocessing.py.)"""
    import tensorflow as tf

    from tasks.preprocess.decode import decode_many
    from tasks.preprocess.graph import pixels as graph_pixels
    from tasks.preprocess.image_format import ImageFormat

    rng = np.random.default_rng(0)
    files = []
    for kind in ("PNG", "JPEG"):
        for height, width in [(40, 90), (300, 200), (161, 160), (20, 30)]:
            y, x = np.mgrid[0:height, 0:width]
            pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width)], -1)
            pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format=kind)
            files.append(out.getvalue())
    # every resize mode with the default filter, every filter with the default mode, both colour modes (each
    # format's graph is traced once: a couple of seconds)
    settings = [(resize, "bilinear") for resize in ("stretch", "crop", "pad")] + \
        [("stretch", interpolation) for interpolation in ("bicubic", "lanczos", "area", "nearest")]
    for resize, interpolation in settings:
        for channels in (1, 3):
            fmt = ImageFormat((48, 64), resize, interpolation, channels)
            ingest = np.stack([pixels for pixels, _ in decode_many(files, [str(i) for i in range(len(files))], fmt)])
            served = tf.function(graph_pixels)(tf.constant(files), fmt).numpy()
            assert served.shape == ingest.shape == (len(files), 48, 64, channels)
            assert np.array_equal(served, ingest), (resize, interpolation, channels)


TF_ONLY_CLIENT = """
import json, sys
import numpy as np
import tensorflow as tf
saved_model, pixels_file, *files = sys.argv[1:]
loaded = tf.saved_model.load(saved_model)
by_images = loaded.signatures["serving_default"](images=tf.constant(np.load(pixels_file)))
by_bytes = loaded.signatures["serve_bytes"](image_bytes=tf.constant([open(f, "rb").read() for f in files]))
imported = sorted({m.split(".")[0] for m in sys.modules} & {"tasks", "pipeline_config", "flows"})
print(json.dumps({"images": by_images["label"].numpy().tolist(), "bytes": by_bytes["label"].numpy().tolist(),
                  "names": [n.decode() for n in by_bytes["class_name"].numpy()],
                  "probabilities": by_bytes["probabilities"].numpy().tolist(), "imported": imported}))
"""


def test_both_signatures_in_a_tensorflow_only_process_give_the_labels_of_tfpipe_predict(served, tmp_path):
    import pyarrow.parquet as pq

    from tasks.preprocess.decode import decode_image
    from tasks.preprocess.image_format import model_format

    cfg, dataset, model = served
    digits, _ = mnist_arrays("test", 24)
    folder = tmp_path / "incoming"
    folder.mkdir()
    sizes = [(28, 28), (56, 56), (40, 60), (90, 45), (33, 71), (120, 120)]
    for i, digit in enumerate(digits):  # the test digits as JPEG and PNG files of other sizes and aspect ratios
        height, width = sizes[i % len(sizes)]
        image = Image.fromarray(digit.reshape(28, 28)).resize((width, height), Image.Resampling.BILINEAR)
        image.save(folder / f"{i:02d}.{'jpg' if i % 2 else 'png'}", format="JPEG" if i % 2 else "PNG", quality=90)
    output = tmp_path / "scored.parquet"
    code, _, err = invoke_cli("predict", "--set", f"artifacts.root={cfg.artifacts.root}", "--model", model.uri,
                              "--allow-unblessed", "--input", str(folder), "--output", str(output))
    assert code == 0, err
    table = pq.read_table(output).to_pydict()
    files = [str(folder / name) for name in table["path"]]
    fmt = model_format(model.image_format, model.image_shape)  # as prediction and serve_bytes make any file
    np.save(tmp_path / "pixels.npy", np.stack([decode_image(open(f, "rb").read(), f, fmt) for f in files]))
    proc = subprocess.run([sys.executable, "-c", TF_ONLY_CLIENT, f"{model.uri}/saved_model",
                           str(tmp_path / "pixels.npy"), *files], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served_out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served_out["imported"] == []  # no tfpipe code: TensorFlow alone serves both signatures
    assert served_out["images"] == table["predicted_label"]
    assert served_out["bytes"] == table["predicted_label"]
    assert served_out["names"] == [str(label) for label in table["predicted_label"]]
    np.testing.assert_allclose(served_out["probabilities"], table["probabilities"], atol=0.05)


def exported_outputs(model_artifact, images: np.ndarray) -> dict[str, np.ndarray]:
    """The TFLite and ONNX files of a published model run here, directly, on `images`."""
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    session = onnxruntime.InferenceSession(f"{model_artifact.uri}/model.onnx", providers=["CPUExecutionProvider"])
    interpreter = Interpreter(model_path=f"{model_artifact.uri}/model.tflite")
    source = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(source["index"], list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], images)
    interpreter.invoke()
    return {"onnx": session.run(None, {session.get_inputs()[0].name: images})[0],
            "tflite": interpreter.get_tensor(interpreter.get_output_details()[0]["index"])}


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_tflite_and_onnx_agree_with_keras_and_the_manifest_says_how_well(served, tmp_path, precision):
    from tasks.data.reader import first_images

    if precision == "float32":
        cfg, dataset, model = served
    else:
        cfg, dataset, model = trained_model(tmp_path / "artifacts", f"train.precision={precision}",
                                            "export.formats=[tflite,onnx]")
    assert model.precision == precision and set(model.exports) >= {"tflite", "onnx"}
    images = first_images(dataset, "test", 512)
    expected = keras_float32(model, images)
    for name, outputs in exported_outputs(model, images).items():
        agreement = float(np.mean(outputs.argmax(1) == expected.argmax(1)))
        parity = model.exports[name]["parity"]
        assert parity["samples"] == len(images) == 512
        assert parity["label_agreement"] == pytest.approx(agreement) and agreement >= 0.999, name
        assert parity["max_abs_diff"] == pytest.approx(np.abs(outputs - expected).max(), abs=1e-6)
        assert model.exports[name]["precision"] == "float32"
    if precision == "mixed_bfloat16":  # the float32 exports against the model as it trained, in bf16
        from tasks.model.published import load_model

        as_trained = load_model(f"{model.uri}/model.keras").predict(images, verbose=0)
        assert np.mean(as_trained.argmax(1) == expected.argmax(1)) >= 0.99


def test_a_corrupted_export_fails_the_check_in_one_line(served, tmp_path):
    import onnx
    from onnx import numpy_helper

    from tasks.model.published import load_model
    from tasks.serve.export import write_format
    from tasks.serve.parity import check_parity

    cfg, dataset, model_artifact = served
    model = load_model(f"{model_artifact.uri}/model.keras")
    write_format(model, str(tmp_path), "onnx", cfg.export, dataset)
    graph = onnx.load(tmp_path / "model.onnx")
    for tensor in graph.graph.initializer:  # the head's bias turned around: other labels, a file that still runs
        values = numpy_helper.to_array(tensor)
        if values.shape == (10,):
            tensor.CopyFrom(numpy_helper.from_array(-values * 50, tensor.name))
    onnx.save(graph, tmp_path / "model.onnx")
    with pytest.raises(PipelineError) as failure:
        check_parity(model, {"onnx": str(tmp_path / "model.onnx")}, cfg.export, dataset)
    message = str(failure.value)
    assert message.startswith("export check failed: onnx agrees with Keras on ") and "\n" not in message
    assert "of 512 test images" in message and "below export.min_label_agreement 0.999" in message


def test_a_format_below_its_threshold_publishes_nothing(tmp_path):
    """int8 against a demand of full agreement, on a model trained one short epoch: the real quantization error
    fails the train stage in one line, and no model is published; `tfpipe export` of the same leaves the
    published model as it was."""
    root = tmp_path / "artifacts"
    weak = ["data.limit=600", "train.epochs=1", "train.batch_size=64", *PLAIN_TRAINING]
    strict = ["export.formats=[tflite]", "export.tflite_quantization=int8", "export.min_label_agreement_int8=1.0"]
    code, _, err = invoke_cli("train", *[a for s in [f"artifacts.root={root}", *weak, *strict] for a in ("--set", s)])
    assert code == 1
    assert err.startswith("tfpipe: error: export check failed: tflite agrees with Keras on ")
    assert "below export.min_label_agreement_int8 1.0: nothing was published" in err
    assert not [p for p in (root / "train").iterdir() if not p.name.startswith(".")]
    code, out, err = invoke_cli("train", "--json", *[a for s in [f"artifacts.root={root}", *weak] for a in ("--set", s)])
    assert code == 0, err
    model_dir = root / "train" / json.loads(out)["fingerprint"]
    before = (model_dir / "manifest.json").read_text()
    code, _, err = invoke_cli("export", "--model", str(model_dir), "--format", "tflite",
                              *[a for s in [f"artifacts.root={root}", *strict] for a in ("--set", s)])
    assert code == 1 and "export check failed: tflite" in err and err.count("\n") == 1
    assert (model_dir / "manifest.json").read_text() == before and not (model_dir / "model.tflite").exists()


def test_int8_quantization_calibrates_on_training_images(served, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from tasks.serve.export import export_published

    cfg, dataset, model = copy_of(served, tmp_path / "artifacts")
    cfg.export.tflite_quantization, cfg.export.min_label_agreement_int8 = "int8", 0.9
    manifest = export_published(cfg, model.fingerprint, ["tflite"])
    entry = manifest["exports"]["tflite"]
    assert entry["quantization"] == "int8" and entry["parity"]["label_agreement"] >= 0.9
    interpreter = Interpreter(model_path=f"{model.uri}/model.tflite")
    # activations in int8 (a batch dimension, -1), their scales measured on the calibration images: dynamic
    # quantization would leave them float
    activations = [t for t in interpreter.get_tensor_details() if t["dtype"] == np.int8
                   and len(t["shape_signature"]) and t["shape_signature"][0] == -1]
    assert activations and all(t["quantization_parameters"]["scales"].size for t in activations)
    assert os.path.getsize(f"{model.uri}/model.tflite") < os.path.getsize(f"{served[2].uri}/model.tflite") / 2


def test_tfpipe_export_and_a_grown_export_list_add_formats_to_published_models(trained, tmp_path):
    import onnxruntime

    from tasks.data.reader import first_images
    from tasks.store.publish import read_manifest
    from tasks.train.stage import train

    cfg, dataset, model = copy_of(trained, tmp_path / "artifacts")
    assert list(model.exports) == ["saved_model"]
    code, out, err = invoke_cli("export", "--set", f"artifacts.root={cfg.artifacts.root}", "--model",
                                model.fingerprint[:12], "--format", "onnx")
    assert code == 0, err
    assert out.startswith("onnx: model.onnx (agrees with Keras on ")
    manifest = read_manifest(model.uri)
    assert set(manifest["exports"]) == {"saved_model", "onnx"} and manifest["exports"]["onnx"]["parity"]["samples"]
    session = onnxruntime.InferenceSession(f"{model.uri}/model.onnx", providers=["CPUExecutionProvider"])
    images = first_images(dataset, "test", 64)
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: images})[0],
                               keras_float32(model, images), atol=1e-5)
    cfg.export.formats = ["saved_model", "onnx", "tflite"]
    again = train(cfg, dataset)  # the same model: reused, the missing format added
    assert again.cache_hit and again.fingerprint == model.fingerprint and set(again.exports) == set(cfg.export.formats)
    assert (tmp_path / "artifacts" / "train" / model.fingerprint / "model.tflite").exists()
    shutil.rmtree(tmp_path / "artifacts" / "ingest")  # the test images exports are checked on: gone
    code, _, err = invoke_cli("export", "--set", f"artifacts.root={cfg.artifacts.root}", "--model", model.uri,
                              "--format", "onnx")
    assert code == 1 and f"the dataset {dataset.fingerprint[:12]} that model {model.fingerprint[:12]} trained on " \
        "is not under" in err and err.count("\n") == 1


def test_the_model_card_holds_the_figures_of_the_run(served, tmp_path):
    from tasks.evaluate.model_card import CARD_JSON, CARD_MATRIX
    from tasks.evaluate.stage import evaluate

    cfg, dataset, model = copy_of(served, tmp_path / "artifacts")
    cfg.model.card.intended_use = "reading handwritten digits in forms"
    cfg.model.card.owners = ["ml-team@example.com"]
    evaluation = evaluate(cfg, dataset, model)
    card = json.loads((tmp_path / "artifacts" / "train" / model.fingerprint / CARD_JSON).read_text())
    metrics = json.loads((tmp_path / "artifacts" / "evaluate" / evaluation.fingerprint / "metrics.json").read_text())
    assert card["evaluation"]["metrics"]["accuracy"] == metrics["accuracy"]
    assert card["evaluation"]["per_class"] == metrics["per_class"]
    assert card["evaluation"]["metrics"]["confusion_matrix"] == metrics["confusion_matrix"]
    assert card["evaluation"]["blessed"] == evaluation.blessed
    assert card["data"]["counts"] == dataset.counts and card["data"]["image_format"]["image_size"] == [32, 32]
    assert card["model"]["parameters"] == model.parameters > 0
    assert card["model"]["exports"]["onnx"]["parity"] == model.exports["onnx"]["parity"]
    assert card["lineage"] == {"dataset": dataset.fingerprint, "model": model.fingerprint,
                               "evaluation": evaluation.fingerprint}
    assert [e["model"] for e in card["evaluation"]["champion_history"]] == [model.fingerprint]
    assert (tmp_path / "artifacts" / "train" / model.fingerprint / CARD_MATRIX).stat().st_size > 0
    code, out, err = invoke_cli("models", "--set", f"artifacts.root={cfg.artifacts.root}", "--card", "champion")
    assert code == 0, err
    assert "reading handwritten digits in forms" in out and "ml-team@example.com" in out
    assert f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}" in out
    assert "resized at ingest to 32x32 (pad, bilinear)" in out
