"""Encoded images (files' bytes, Parquet cells) to the pixels of a format, many at a time: graph.py's one
preprocessing in a tf.data pipeline on every core, each image's failure kept apart and named. Pillow decodes only
the formats TensorFlow does not (TIFF, ICO, PPM, ...): it orients the image and hands its pixels to the same steps
after decoding (graph.py `from_array`); a served model refuses those formats (README, "Your own images").

Also here: arrays of pixels made a format's size (`to_format`), and pixels re-encoded for a cache that stores PNG
or JPEG (`encode_image`).
"""

from __future__ import annotations

import functools
import io
import re

import numpy as np

from tasks.errors import PipelineError, first_line
from tasks.preprocess.image_format import IMAGE_MAGIC, ImageFormat, NotAnImage

Decoded = tuple[np.ndarray, tuple[int, int]]  # pixels, and the image's own (height, width) as displayed
BATCH = 64  # decoded images handed over at a time


@functools.lru_cache(maxsize=16)
def _graphs(fmt: ImageFormat):
    """The format's compiled steps: the header probe of a batch, one image's decoding (with its probed size), the
    steps after decoding (Pillow's images), and the whole preprocessing of one file."""
    import tensorflow as tf

    from tasks.preprocess import graph

    blob, blobs = tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.string)
    probe = tf.function(graph.probe, input_signature=[blobs])

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32), blob, tf.TensorSpec([], tf.int32),
                                  tf.TensorSpec([2], tf.int64), tf.TensorSpec([], tf.int32)])
    def decode(index, data, kind, size, orientation):  # traced once, not by every pipeline
        return (index, *graph.decode(data, kind, size, orientation, fmt))

    @tf.function(input_signature=[blob])
    def whole(data):
        kinds, sizes, orientations = graph.probe(data[None])
        return graph.decode(data, kinds[0], sizes[0], orientations[0], fmt)

    return decode, probe, tf.function(lambda image: graph.from_array(image, fmt), reduce_retracing=True), whole


def decode_many(blobs: list[bytes], names: list[str], fmt: ImageFormat) -> list[Decoded | PipelineError]:
    """Each blob's pixels in the format and its own size, or the PipelineError that says why not (NotAnImage for
    bytes of no image format). Decoded in parallel; memory holds the blobs and their pixels."""
    import tensorflow as tf

    decode, probe, _, _ = _graphs(fmt)
    results: list = [None] * len(blobs)
    if blobs:
        pipeline = tf.data.Dataset.from_tensor_slices((tf.range(len(blobs)), tf.constant(blobs, tf.string)))
        pipeline = pipeline.batch(BATCH).map(lambda i, b: (i, b, *probe(b)),  # headers read a batch at a time
                                             num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        pipeline = pipeline.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
        if fmt.size is not None and fmt.channels:  # one shape: batched, one step of Python per BATCH images
            pipeline = pipeline.batch(BATCH)
        else:
            pipeline = pipeline.map(lambda index, pixels, size: (index[None], pixels[None], size[None]))
        for indices, images, sizes in pipeline.as_numpy_iterator():
            for index, pixels, size in zip(indices, images, sizes):
                results[index] = (pixels, (int(size[0]), int(size[1])))
    for index, result in enumerate(results):
        if result is None:  # refused by the graph: another format, too many pixels, or a broken image
            results[index] = _one_by_one(blobs[index], names[index], fmt)
    return results


def tensorflow_decodes(blob: bytes) -> bool:
    """Whether the bytes are of a format the graph decodes (and a served model takes), from their first bytes."""
    _, probe, _, _ = _graphs(ImageFormat())
    return int(probe([blob])[0].numpy()[0]) >= 0


def decode_image(blob: bytes, where: str, fmt: ImageFormat) -> np.ndarray:
    """One encoded image's pixels in the format (PipelineError naming `where` when it has none)."""
    result = decode_many([blob], [where], fmt)[0]
    if isinstance(result, PipelineError):
        raise result
    return result[0]


def _one_by_one(blob: bytes, where: str, fmt: ImageFormat) -> Decoded | PipelineError:
    """Why the graph refused an image, as a PipelineError; or its pixels through Pillow for another format."""
    from tasks.preprocess.graph import KINDS

    import tensorflow as tf

    _, probe, _, whole = _graphs(fmt)
    kind, size, orientation = (v.numpy()[0] for v in probe([blob]))
    if kind < 0:
        return _with_pillow(blob, where, fmt)
    try:
        if kind == 0:  # a JPEG's size, from libjpeg's reading of its header
            size = tf.io.extract_jpeg_shape(blob).numpy()[:2][:: -1 if orientation >= 5 else 1]
        height, width = int(size[0]), int(size[1])
        if height * width > fmt.max_pixels:
            return _too_big(where, height, width, fmt)
        pixels, _ = whole(blob)
        return pixels.numpy(), (height, width)
    except Exception as exc:  # truncated data, a broken stream: TensorFlow's InvalidArgumentError
        return PipelineError(f"{where} is not a decodable {KINDS[kind]} image ({reason(exc)}): check the file")


def reason(exc: Exception) -> str:
    """A TensorFlow op's error as one line, without the names of the graph functions it ran in."""
    return first_line(re.sub(r"\{\{[^}]*\}\}\s*", "", getattr(exc, "message", None) or str(exc)))


def _too_big(where: str, height: int, width: int, fmt: ImageFormat) -> PipelineError:
    return PipelineError(f"{where} declares {height}x{width} pixels, over data.max_image_pixels={fmt.max_pixels} (a "
                         "decompression bomb?): it was not decoded; raise the limit if such images are expected")


def _with_pillow(blob: bytes, where: str, fmt: ImageFormat) -> Decoded | PipelineError:
    """A format TensorFlow does not decode: Pillow decodes and orients it, graph.py makes it the format."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # the size is checked here, against the configured limit, naming the file
    try:
        image = Image.open(io.BytesIO(blob))
    except UnidentifiedImageError as exc:
        if not blob.startswith(IMAGE_MAGIC):
            return NotAnImage(f"{where} is not an image (no format Pillow knows): check the file")
        return PipelineError(f"{where} is not a decodable image ({first_line(exc)}): check the file")
    except Exception as exc:
        return PipelineError(f"{where} is not a decodable image ({first_line(exc)}): check the file")
    if image.width * image.height > fmt.max_pixels:
        return _too_big(where, image.height, image.width, fmt)
    try:
        pixels = pillow_pixels(ImageOps.exif_transpose(image))
    except Exception as exc:  # truncated data, a broken stream: Pillow raises OSError, SyntaxError, ValueError...
        return PipelineError(f"{where} is not a decodable image ({first_line(exc)}): check the file")
    _, _, from_array, _ = _graphs(fmt)
    return from_array(pixels).numpy(), pixels.shape[:2]


def image_mode(stream) -> str | None:
    """The Pillow mode of the image in a binary stream, from its header alone (Pillow reads as much of the stream
    as the format's header needs); None when it is no image or a broken one."""
    from PIL import Image

    try:
        with Image.open(stream) as image:
            return image.mode
    except Exception:  # UnidentifiedImageError, a truncated header: decoding decides what to do with the file
        return None


def pillow_pixels(image) -> np.ndarray:
    """A decoded Pillow image as uint8 [h, w, 1 or 3], by the graph's rules: 16-bit and wider grey keeps the top 8
    of its 16 bits, other grey modes stay grey, everything else becomes RGB."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image.convert("I") if image.mode == "I" else image).astype(np.int64)
        image = Image.fromarray((values >> 8).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode not in ("1", "L", "LA"):
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    pixels = np.asarray(image.convert("L") if image.mode in ("1", "LA") else image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def to_format(images: np.ndarray, fmt: ImageFormat | None) -> np.ndarray:
    """Raw pixel arrays [n, h, w, c] made the format's size and channels (graph.py's steps after decoding), when
    it asks for another shape."""
    if fmt is None:
        return images
    wanted_channels = fmt.channels or images.shape[-1]
    if fmt.size is None and images.shape[-1] == wanted_channels:
        return images
    if fmt.size is not None and list(images.shape[1:3]) == list(fmt.size) and images.shape[-1] == wanted_channels:
        return images
    _, _, from_array, _ = _graphs(fmt)
    return np.stack([from_array(image).numpy() for image in images]) if len(images) else images


def encode_image(pixels: np.ndarray, encoding: str) -> bytes:
    """uint8 pixels [h, w, c] as PNG (lossless, zlib's fastest level: ingest pays it for every image) or JPEG
    (quality 95) bytes, for a cache that stores them so."""
    from PIL import Image

    out = io.BytesIO()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    if encoding == "png":
        image.save(out, format="PNG", compress_level=1)
    else:
        image.save(out, format="JPEG", quality=95)
    return out.getvalue()
