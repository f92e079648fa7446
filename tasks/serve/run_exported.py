"""Runs exported model files in a process of their own, as a server or a device would load them, and writes their
outputs: `python -m tasks.serve.run_exported WORK_DIR`. It reads `request.json` ({format: file}) and `sample.npz`
(uint8 `images` at the model's size, and encoded images as `blobs` cut at `offsets`) and writes `outputs.npz`. It imports only what each
format needs (TensorFlow, onnxruntime, ai_edge_litert), never Keras or tfpipe's stages.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

BATCH = 64


def as_input(images: np.ndarray, dtype) -> np.ndarray:
    """uint8 images as a format's input takes them: as they are, or, for a model published before models scaled
    their own input (a float input), in [0, 1] (tasks/model/published.py model_input)."""
    return images if np.dtype(dtype) == np.uint8 else images.astype(np.float32) / 255.0


def in_batches(run, inputs) -> np.ndarray:
    return np.concatenate([run(inputs[i:i + BATCH]) for i in range(0, len(inputs), BATCH)])


def saved_model_outputs(path: str, images: np.ndarray, blobs: list[bytes]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    signatures = loaded.signatures
    encoded = np.array(blobs, dtype=object)

    def by_bytes(name: str, key: str):
        return lambda b: signatures[name](image_bytes=tf.constant(list(b), tf.string))[key].numpy()

    return {"saved_model": in_batches(lambda x: signatures["serving_default"](images=tf.constant(x))["probabilities"]
                                      .numpy(), images),
            "saved_model_bytes": in_batches(by_bytes("serve_bytes", "probabilities"), encoded),
            "saved_model_pixels": in_batches(by_bytes("preprocess_bytes", "images"), encoded)}


def tflite_outputs(path: str, images: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], [len(images), *images.shape[1:]])  # exported with batch 1
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], as_input(images, source["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(target["index"]).astype(np.float32)


def onnx_outputs(path: str, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    source = session.get_inputs()[0]
    dtype = np.uint8 if source.type == "tensor(uint8)" else np.float32
    return in_batches(lambda x: session.run(None, {source.name: as_input(x, dtype)})[0], images).astype(np.float32)


def main(work: str) -> None:
    with open(os.path.join(work, "request.json")) as f:
        files = json.load(f)
    sample = np.load(os.path.join(work, "sample.npz"))
    images, data, offsets = sample["images"], sample["blobs"].tobytes(), sample["offsets"]
    blobs = [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    outputs = {}
    if "saved_model" in files:
        outputs.update(saved_model_outputs(files["saved_model"], images, blobs))
    if "tflite" in files:
        outputs["tflite"] = tflite_outputs(files["tflite"], images)
    if "onnx" in files:
        outputs["onnx"] = onnx_outputs(files["onnx"], images)
    np.savez(os.path.join(work, "outputs.npz"), **outputs)


if __name__ == "__main__":
    main(sys.argv[1])
