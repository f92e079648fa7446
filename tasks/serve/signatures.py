"""The SavedModel's two signatures, which take what a client has and do in the graph what ingest did for the model's
dataset, so that no client repeats a preprocessing step.

- `serving_default`: uint8 images `[N, H, W, C]` (`images`), at the model's size.
- `serve_bytes`: a `tf.string` batch of encoded images (`image_bytes`: JPEG, PNG, GIF's first frame, BMP) of any
  size, made the model's pixels by tasks/preprocess/graph.py, the twin of what tasks/preprocess/decode.py does at
  ingest (the same stretch, centre crop or pad, the same filter, antialiased when shrinking).

Both return `probabilities` (one column per class), `label` (int32) and `class_name` (string). Unlike ingest,
the graph does not apply EXIF orientation: clients send upright images (`tfpipe predict` applies it).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tasks.model.published import model_input
from tasks.preprocess.graph import decode_resized
from tasks.preprocess.image_format import ImageFormat

SIGNATURES = ("serving_default", "serve_bytes")


def predictions(model: keras.Model, images: tf.Tensor, class_names: tf.Tensor) -> dict[str, tf.Tensor]:
    """The model's answer for uint8 images: probabilities per class (a single sigmoid unit is P(class 1)), the
    label and its name."""
    outputs = tf.cast(model(model_input(model, images), training=False), tf.float32)
    if outputs.shape[-1] == 1:
        outputs = tf.concat([1.0 - outputs, outputs], axis=1)
    label = tf.argmax(outputs, axis=1, output_type=tf.int32)
    return {"probabilities": outputs, "label": label, "class_name": tf.gather(class_names, label)}


def serving_archive(model: keras.Model, image_shape: list[int], image_format: dict,
                    class_names: list[str]) -> keras.export.ExportArchive:
    """An ExportArchive of `model` with the two signatures; `write_out(path)` makes the SavedModel."""
    shape = list(image_shape)
    fmt = ImageFormat.from_settings(image_format)
    names = tf.constant(class_names)

    def serve_images(images):
        return predictions(model, images, names)

    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda blob: decode_resized(blob, fmt, shape), image_bytes,
                           fn_output_signature=tf.TensorSpec(shape, tf.uint8))
        return predictions(model, images, names)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_images,
                         input_signature=[tf.TensorSpec([None, *shape], tf.uint8, name="images")])
    archive.add_endpoint("serve_bytes", serve_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    return archive
