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
from tasks.preprocess.decode import encode_image
from tasks.store.refs import DatasetArtifact
from tasks.store.storage import join


def keras_probabilities(model, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    forward = tf.function(lambda x: model(model_input(model, x), training=False))
    outputs = np.concatenate([forward(images[i:i + 256]).numpy() for i in range(0, len(images), 256)])
    return class_probabilities(outputs.astype(np.float32))


def run_in_own_process(files: dict[str, str], images: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs of the exported files on `images`, from `python -m tasks.serve.run_exported` (PNG bytes of the
    same images for the SavedModel's serve_bytes)."""
    blobs = [encode_image(image, "png") for image in images]
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


def check_parity(model, files: dict[str, str], cfg: ExportConfig, dataset: DatasetArtifact) -> dict[str, dict]:
    """Label agreement and the largest probability difference of each format against Keras on the first
    `export.parity_samples` test images; PipelineError naming the first format below its threshold. The
    SavedModel is compared with the model as trained, the float32 formats with the model computing in float32:
    the check is of the conversion, not of the precision."""
    images = first_images(dataset, "test", cfg.parity_samples)

    @functools.cache  # each reference once, and the float32 copy (a clone of the model) only when needed
    def keras_reference(in_float32: bool) -> np.ndarray:
        return keras_probabilities(with_dtype_policy(model, "float32") if in_float32 else model, images)

    figures = {}
    for name, outputs in run_in_own_process(files, images).items():
        expected = keras_reference(not name.startswith("saved_model"))
        probabilities = class_probabilities(outputs)
        figures[name] = {"samples": len(images),
                         "label_agreement": float(np.mean(probabilities.argmax(1) == expected.argmax(1))),
                         "max_abs_diff": float(np.max(np.abs(probabilities - expected)))}
    for name, figure in figures.items():
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
