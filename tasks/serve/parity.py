"""The check every serving format passes before it is published: each exported file run in a process of its own
(run_exported.py, as a server or a device would load it) on `export.parity_samples` test images, its labels and
probabilities compared with Keras'. Label agreement below `export.min_label_agreement` fails the stage in one
line, naming the format."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from pipeline_config import ExportConfig
from tasks.data.reader import first_images
from tasks.errors import PipelineError, first_line
from tasks.model.precision import with_dtype_policy
from tasks.model.published import class_probabilities, model_input
from tasks.preprocess.decode import decode_many, encode_image, tensorflow_decodes
from tasks.preprocess.image_format import model_format
from tasks.store import storage
from tasks.store.refs import DatasetArtifact
from tasks.store.storage import join

MAX_PIXEL_DIFFERENCE = 1  # levels: the same ops on another machine's CPU may round a float the other way


def keras_probabilities(model, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    forward = tf.function(lambda x: model(model_input(model, x), training=False))
    outputs = np.concatenate([forward(images[i:i + 256]).numpy() for i in range(0, len(images), 256)])
    return class_probabilities(outputs.astype(np.float32))


def run_in_own_process(files: dict[str, str], images: np.ndarray, blobs: list[bytes]) -> dict[str, np.ndarray]:
    """The outputs of the exported files on `images`, and of the SavedModel's byte signatures on `blobs`, from
    `python -m tasks.serve.run_exported`."""
    with tempfile.TemporaryDirectory(prefix="tfpipe-parity-") as work:
        np.savez(join(work, "sample.npz"), images=images, blobs=np.frombuffer(b"".join(blobs), np.uint8),
                 offsets=np.cumsum([0] + [len(b) for b in blobs]))
        with open(join(work, "request.json"), "w") as f:
            json.dump(files, f)
        done = subprocess.run([sys.executable, "-m", "tasks.serve.run_exported", work], capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise PipelineError(f"the exported model files did not run in a process of their own ("
                                f"{first_line(lines[-1] if lines else 'exit ' + str(done.returncode), 200)}): "
                                "nothing was published; check the export formats' packages (pip install -e .)")
        with np.load(join(work, "outputs.npz")) as outputs:
            return {name: outputs[name] for name in outputs.files}


def encoded_sample(dataset: DatasetArtifact, images: np.ndarray) -> tuple[list[bytes], np.ndarray, str]:
    """(encoded images, the pixels ingest made of them, what they are) for the serving graph's check: the test
    split's own files as they are in the folder or bucket, each with the cached pixels of its record (files
    TensorFlow does not decode, which a served model refuses, left out); for a source without files, the test
    images re-encoded as PNG at twice their size, with the pixels ingest's code makes of those."""
    files = dataset.test_files
    blobs, expected = [], []
    for index, rel in enumerate(files.get("paths", [])[: len(images)]):
        try:
            with storage.open_file(join(files["root"], rel)) as f:
                blob = f.read()
        except OSError:  # moved or removed since ingest: the files left are the sample
            continue
        if tensorflow_decodes(blob):
            blobs.append(blob)
            expected.append(images[index])
    if blobs:
        return blobs, np.stack(expected), f"{len(blobs)} of the test split's own files"
    fmt = model_format(dataset.image_format, dataset.image_shape)
    blobs = [encode_image(np.repeat(np.repeat(image, 2, axis=0), 2, axis=1), "png") for image in images]
    decoded = decode_many(blobs, [f"test image {i}" for i in range(len(blobs))], fmt)
    return blobs, np.stack([pixels for pixels, _ in decoded]), f"{len(blobs)} test images as PNG at twice their size"


def check_parity(model, files: dict[str, str], cfg: ExportConfig, dataset: DatasetArtifact) -> dict[str, dict]:
    """Label agreement and the largest probability difference of each format against Keras on the first
    `export.parity_samples` test images; PipelineError naming the first format below its threshold. The
    SavedModel is compared with the model as trained, the float32 formats with the model computing in float32:
    the check is of the conversion, not of the precision. The SavedModel's `serve_bytes` runs on encoded images
    (`encoded_sample`): the pixels it feeds the model must be the ones ingest cached, exactly (at most
    MAX_PIXEL_DIFFERENCE apart, where another machine's float rounding differs)."""
    images = first_images(dataset, "test", cfg.parity_samples)
    blobs, expected_pixels, sample = encoded_sample(dataset, images)

    @functools.cache  # each reference once, and the float32 copy (a clone of the model) only when needed
    def keras_reference(in_float32: bool, encoded: bool = False) -> np.ndarray:
        return keras_probabilities(with_dtype_policy(model, "float32") if in_float32 else model,
                                   expected_pixels if encoded else images)

    figures = {}
    outputs = run_in_own_process(files, images, blobs)
    if "saved_model_pixels" in outputs:
        figures["saved_model_pixels"] = pixel_figures(outputs.pop("saved_model_pixels"), expected_pixels, sample)
    for name, output in outputs.items():
        expected = keras_reference(not name.startswith("saved_model"), name == "saved_model_bytes")
        probabilities = class_probabilities(output)
        figures[name] = {"samples": len(output),
                         "label_agreement": float(np.mean(probabilities.argmax(1) == expected.argmax(1))),
                         "max_abs_diff": float(np.max(np.abs(probabilities - expected)))}
    pixels = figures.get("saved_model_pixels")
    if pixels and pixels["max_abs_diff"] > MAX_PIXEL_DIFFERENCE:
        raise PipelineError(
            f"export check failed: serve_bytes feeds the model other pixels than ingest cached for "
            f"{pixels['samples'] - pixels['equal']} of {pixels['sample']} (largest difference "
            f"{pixels['max_abs_diff']} levels): nothing was published; the serving graph and ingest must run the "
            "same preprocessing")
    for name, figure in figures.items():
        if "label_agreement" not in figure:
            continue
        int8 = name == "tflite" and cfg.tflite_quantization == "int8"
        needed = cfg.min_label_agreement_int8 if int8 else cfg.min_label_agreement
        if figure["label_agreement"] < needed:
            setting = "export.min_label_agreement" + ("_int8" if int8 else "")
            raise PipelineError(
                f"export check failed: {name} agrees with Keras on {figure['label_agreement']:.2%} of "
                f"{figure['samples']} test images (largest probability difference {figure['max_abs_diff']:.3g}), "
                f"below {setting} {needed}: nothing was published; drop the format, change its quantization, or "
                "lower the threshold")
    return figures


def pixel_figures(served: np.ndarray, cached: np.ndarray, sample: str) -> dict:
    """How the pixels serve_bytes feeds the model compare with the ones ingest cached."""
    difference = np.abs(served.astype(np.int16) - cached.astype(np.int16)).reshape(len(served), -1).max(axis=1)
    return {"sample": sample, "samples": len(served), "equal": int((difference == 0).sum()),
            "max_abs_diff": int(difference.max(initial=0))}
