"""The SavedModel's signatures, which take what a client has and do in the graph what ingest did for the model's
dataset, so that no client repeats a preprocessing step.

- `serving_default`: uint8 images `[N, H, W, C]` (`images`), at the model's size.
- `serve_bytes`: a `tf.string` batch of encoded images (`image_bytes`: JPEG, PNG, GIF's first frame, BMP, WebP) of
  any size, made the model's pixels by tasks/preprocess/graph.py, the very function ingest ran on the training
  images (EXIF orientation, bit depth, grey, the resize, the size limit). Another format (TIFF) is refused.

Both return `probabilities` (one column per class), `label` (int32) and `class_name` (string). A third,
`preprocess_bytes`, returns the pixels `serve_bytes` feeds the model (`images`): what the publish-time check
compares with the cache, and what a client can inspect.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tasks.model.published import model_input
from tasks.preprocess.graph import pixels
from tasks.preprocess.image_format import model_format

SIGNATURES = ("serving_default", "serve_bytes", "preprocess_bytes")


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
    """An ExportArchive of `model` with the signatures; `write_out(path)` makes the SavedModel."""
    shape = list(image_shape)
    fmt = model_format(image_format, shape)
    names = tf.constant(class_names)

    def serve_images(images):
        return predictions(model, images, names)

    def preprocess_bytes(image_bytes):
        return {"images": pixels(image_bytes, fmt)}

    def serve_bytes(image_bytes):
        return predictions(model, preprocess_bytes(image_bytes)["images"], names)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_images,
                         input_signature=[tf.TensorSpec([None, *shape], tf.uint8, name="images")])
    archive.add_endpoint("serve_bytes", serve_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("preprocess_bytes", preprocess_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    return archive
