"""Serving formats of the default model: speed, size and agreement with Keras, side by side in one run.

    python -m bench.export [--epochs N] [--images 10000]

Trains the default config on full MNIST (`--epochs` to shorten it), exports the SavedModel, ONNX and TFLite
(float32, dynamic-range, float16 and int8 quantization), then scores the test images with each in a fresh process
of its own, in batches of 256: Keras `predict` (the model as trained), the SavedModel's `serving_default`,
onnxruntime and the LiteRT interpreter (all cores each). Reports images/s, file sizes and label agreement with
Keras; prints the figures and writes bench/results/<date>-<host>-export.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import REPO, in_fresh_process

RESULTS = REPO / "bench" / "results"
BATCH = 256
TFLITE = ("none", "dynamic", "float16", "int8")


def side(name: str, args: dict) -> dict:
    """The body of one measurement (run in the fresh process)."""
    if name == "train":
        from pipeline_config import load_config
        from tasks.data.ingest import ingest
        from tasks.data.reader import first_images
        from tasks.model.published import load_model
        from tasks.serve.export import write_format
        from tasks.train.stage import train

        overrides = [f"artifacts.root={args['root']}"] + ([f"train.epochs={args['epochs']}"] if args["epochs"] else [])
        cfg = load_config(overrides=overrides)
        dataset = ingest(cfg.data, cfg.artifacts.root)
        started = time.perf_counter()
        model_artifact = train(cfg, dataset)
        seconds = time.perf_counter() - started
        np.save(args["images"], first_images(dataset, "test", args["count"]))
        model = load_model(f"{model_artifact.uri}/model.keras")
        files = {"keras": f"{model_artifact.uri}/model.keras", "saved_model": f"{model_artifact.uri}/saved_model"}
        for quantization in TFLITE:
            out = Path(args["root"]) / f"tflite-{quantization}"
            cfg.export.tflite_quantization = quantization
            write_format(model, str(out), "tflite", cfg.export, dataset)
            files[f"tflite {quantization}"] = str(out / "model.tflite")
        write_format(model, str(Path(args["root"]) / "onnx"), "onnx", cfg.export, dataset)
        files["onnx"] = str(Path(args["root"]) / "onnx" / "model.onnx")
        return {"files": files, "train_seconds": seconds, "precision": model_artifact.precision}
    images = np.load(args["images"])
    run = runner(name, args["path"])
    run(images[:BATCH])  # loading, tracing and first-call allocation are no format's steady rate
    started = time.perf_counter()
    if name == "keras":  # one predict call, which batches itself (a call per batch would time its set-up)
        outputs = run(images)
    else:
        outputs = np.concatenate([run(images[i:i + BATCH]) for i in range(0, len(images), BATCH)])
    seconds = time.perf_counter() - started
    np.save(args["outputs"], outputs.astype(np.float32))
    return {"images": len(images), "seconds": seconds}


def runner(kind: str, path: str):
    """A function of a uint8 batch to the model's outputs, for one format."""
    if kind == "keras":
        from tasks.model.published import load_model

        model = load_model(path)
        return lambda batch: model.predict(batch, batch_size=BATCH, verbose=0)
    if kind == "saved_model":
        import tensorflow as tf

        signature = tf.saved_model.load(path).signatures["serving_default"]
        return lambda batch: signature(images=tf.constant(batch))["probabilities"].numpy()
    if kind == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})[0]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=os.cpu_count())
    source, target = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    shape = [None]

    def run(batch):
        if shape[0] != len(batch):  # the file's batch is 1: sized for each new batch length
            interpreter.resize_tensor_input(source, list(batch.shape))
            interpreter.allocate_tensors()
            shape[0] = len(batch)
        interpreter.set_tensor(source, batch)
        interpreter.invoke()
        return interpreter.get_tensor(target)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--images", type=int, default=10000, help="test images scored by each format")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(side(args.measure[0], json.loads(args.measure[1]))))
        return
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="tfpipe-bench-export-"))
    images = str(work / "images.npy")
    trained = in_fresh_process("bench.export", "train", {"root": str(work / "artifacts"), "epochs": args.epochs,
                                                         "images": images, "count": args.images})
    runs, outputs = {}, {}
    for name, path in trained["files"].items():
        out = str(work / f"outputs-{name.replace(' ', '-')}.npy")
        runs[name] = in_fresh_process("bench.export", name.split()[0], {"path": path, "images": images, "outputs": out})
        outputs[name] = np.load(out)
    keras_labels = outputs["keras"].argmax(1)
    sizes = {name: sum(f.stat().st_size for f in Path(path).rglob("*")) if Path(path).is_dir() else
             Path(path).stat().st_size for name, path in trained["files"].items()}
    figures = {}
    for name in runs:
        figures[f"{name}: images/s"] = runs[name]["images"] / runs[name]["seconds"]
        figures[f"{name}: file MB"] = sizes[name] / 1e6
        figures[f"{name}: label agreement with Keras"] = float(np.mean(outputs[name].argmax(1) == keras_labels))
    for name, value in figures.items():
        print(f"{name:60s} {value:14,.4f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{datetime.date.today()}-{socket.gethostname()}-export.json"
    out.write_text(json.dumps({"host": socket.gethostname(), "cpus": os.cpu_count(), "figures": figures,
                               "raw": {"runs": runs, "sizes": sizes, "train_seconds": trained["train_seconds"],
                                       "precision": trained["precision"], "epochs": args.epochs},
                               "minutes": (time.time() - started) / 60}, indent=2))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
