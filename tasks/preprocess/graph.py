"""The serving graph's twin of tasks/preprocess/decode.py: one encoded image to the model's uint8 pixels in
TensorFlow ops, inside the SavedModel's `serve_bytes` signature (tasks/serve/signatures.py). Each step here has
its Pillow counterpart there, named in its docstring, so that a change to one shows in the other: decoding (a
JPEG at the scale Pillow's draft picks, libjpeg's accurate DCT), the channels (grey as Pillow's L, rounded), the
stretch, centre crop or pad, and the same filter, antialiased when shrinking. Unlike ingest, the graph does not
apply EXIF orientation: clients send upright images (`tfpipe predict` applies it)."""

from __future__ import annotations

import tensorflow as tf

from tasks.preprocess.image_format import ImageFormat

# Pillow's filters (decode.py RESAMPLING) as tf.image.resize names them; both widen when shrinking.
TF_RESIZE_METHOD = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "lanczos3",
                    "area": "area"}


def decode_resized(blob: tf.Tensor, fmt: ImageFormat, shape: list[int]) -> tf.Tensor:
    """One encoded image to uint8 [H, W, C] as ingest makes it: decoded (a JPEG that shrinks at the scale
    Pillow's draft picks), converted to the channels (grey as Pillow's L, rounded), then resized. A dataset that
    kept its images' own size is stretched to the model's."""
    height, width, channels = shape
    image = tf.cond(tf.io.is_jpeg(blob), lambda: _decode_jpeg(blob, fmt),
                    lambda: tf.io.decode_image(blob, channels=3, expand_animations=False))
    image = tf.cast(image, tf.float32)
    if channels == 1:
        image = tf.round(tf.image.rgb_to_grayscale(image))
    image.set_shape([None, None, channels])
    if fmt.resize == "crop":
        image = _centre_crop(image, height, width)
    if fmt.resize == "pad":
        image = _resize_to_fit_and_pad(image, height, width, fmt.interpolation)
    else:
        image = _resize(image, tf.constant([height, width]), fmt.interpolation)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _decode_jpeg(blob: tf.Tensor, fmt: ImageFormat) -> tf.Tensor:
    """A JPEG decoded as Pillow decodes it at ingest: libjpeg's accurate DCT, and, when the image shrinks at least
    two-fold, at 1/2, 1/4 or 1/8 of its size (decoding._draft, Pillow's JpegImageFile.draft)."""
    if fmt.size is None:
        return tf.io.decode_jpeg(blob, channels=3, dct_method="INTEGER_ACCURATE")
    size = tf.cast(tf.io.extract_jpeg_shape(blob)[:2], tf.float64)
    target = tf.constant(fmt.size, tf.float64)
    if fmt.resize == "stretch":
        need = target
    else:
        ratios = target / size
        scale = tf.reduce_max(ratios) if fmt.resize == "crop" else tf.reduce_min(ratios)
        need = tf.math.ceil(size * scale)
    fold = tf.reduce_min(tf.math.floordiv(size, tf.maximum(need, 1.0)))
    index = tf.reduce_sum(tf.cast(fold >= tf.constant([2.0, 4.0, 8.0], tf.float64), tf.int32))  # ratio 1, 2, 4, 8
    return tf.switch_case(index, [
        lambda ratio=ratio: tf.io.decode_jpeg(blob, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
        for ratio in (1, 2, 4, 8)])


def _resize(image: tf.Tensor, size: tf.Tensor, interpolation: str) -> tf.Tensor:
    """Pillow's filter of that name, widened when shrinking (tf.image.resize's "area" is another filter than
    Pillow's BOX: the box kernel of ScaleAndTranslate is the same)."""
    if interpolation != "area":
        return tf.image.resize(image, size, method=TF_RESIZE_METHOD[interpolation], antialias=True)
    scale = tf.cast(size, tf.float32) / tf.cast(tf.shape(image)[:2], tf.float32)
    return tf.raw_ops.ScaleAndTranslate(images=image[None], size=size, scale=scale, translation=tf.zeros([2]),
                                        kernel_type="box", antialias=True)[0]


def _centre_crop(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """The centre cut of `image` to the aspect ratio of height x width (decoding.resized's box, same rounding)."""
    size = tf.cast(tf.shape(image)[:2], tf.float64)
    h, w = size[0], size[1]
    crop_w = tf.minimum(w, tf.round(h * width / height))
    crop_h = tf.minimum(h, tf.round(w * height / width))
    top, left = tf.math.floordiv(h - crop_h, 2), tf.math.floordiv(w - crop_w, 2)
    return tf.image.crop_to_bounding_box(image, *(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w)))


def _resize_to_fit_and_pad(image: tf.Tensor, height: int, width: int, interpolation: str) -> tf.Tensor:
    """Resized to fit inside height x width, then centred on black (decoding.resized's pad)."""
    size = tf.cast(tf.shape(image)[:2], tf.float64)
    scale = tf.minimum(width / size[1], height / size[0])
    fit = tf.cast(tf.maximum(tf.round(size * scale), 1.0), tf.int32)
    image = _resize(image, fit, interpolation)
    return tf.image.pad_to_bounding_box(image, (height - fit[0]) // 2, (width - fit[1]) // 2, height, width)
