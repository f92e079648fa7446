"""The one preprocessing: an encoded image to the model's uint8 pixels, in TensorFlow ops. Ingest (a folder's files,
encoded images in Parquet), prediction on image files and the SavedModel's `serve_bytes` all run `pixels`, so what
the model receives cannot differ between them (tasks/preprocess/decode.py runs it on many files at once).

The steps, in order:
- the format from the first bytes: JPEG, PNG, GIF (its first frame), BMP, WebP; anything else is refused here
  (ingest decodes it with Pillow, then runs the steps after decoding: `from_array`);
- the size the header declares, checked against `data.max_image_pixels` before any pixel is decoded (a
  decompression bomb costs nothing), and the EXIF orientation (a JPEG's APP1, a PNG's eXIf chunk);
- decoding: a JPEG with libjpeg's accurate DCT (Pillow's pixels exactly), at 1/2, 1/4 or 1/8 of its size when it
  shrinks that much (the decoder's DCT scaling: a 24 MP photo costs a fraction of its pixels); a 16-bit PNG by its
  bit depth, the top 8 bits of every value, whatever the image's own range;
- the orientation applied; the channels: RGB, or grey by Pillow's "L" formula (ITU-R 601-2 luma, integer);
- the size: stretch, centre crop or pad to `data.image_size` with `data.interpolation`, antialiased when a side
  shrinks two-fold or more (after a JPEG's DCT scaling, what is left to shrink is less than that).
"""

from __future__ import annotations

import tensorflow as tf

from tasks.preprocess.image_format import ImageFormat

KINDS = ("JPEG", "PNG", "GIF", "BMP", "WebP")  # what TensorFlow decodes, by index; -1: another format
HEAD = 1 << 16  # the bytes at a file's start that hold its size and its EXIF orientation
METHOD = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "lanczos3",
          "area": "area"}
ORIENTATION_TAG = 0x0112
IFD_ENTRIES = 64  # EXIF entries looked at for the orientation (cameras put it among the first dozen)


def head(blob: tf.Tensor) -> tf.Tensor:
    """The first HEAD bytes, followed by zero bytes: every header read below (at most 1 KiB from a position
    clamped to HEAD) stays inside, however short the file."""
    return tf.strings.join([tf.strings.substr(blob, 0, HEAD), tf.constant(b"\0" * (HEAD + 1024))])


def _bytes(start: tf.Tensor, pos, count: int) -> tf.Tensor:
    """`count` bytes of a padded head from `pos` (clamped into the head), as int64."""
    pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, HEAD)
    raw = tf.io.decode_raw(tf.strings.substr(start, pos, count), tf.uint8)
    return tf.cast(raw, tf.int64)


def _number(raw: tf.Tensor, little: tf.Tensor) -> tf.Tensor:
    """Bytes as an unsigned integer, little- or big-endian."""
    weights = tf.bitwise.left_shift(tf.constant(1, tf.int64), 8 * tf.range(tf.size(raw), dtype=tf.int64))
    return tf.reduce_sum(raw * tf.where(little, weights, tf.reverse(weights, [0])))


def image_kind(start: tf.Tensor) -> tf.Tensor:
    """Index into KINDS from the magic bytes; -1 for any other format (or no image at all)."""
    magic = [tf.strings.substr(start, 0, 3) == b"\xff\xd8\xff", tf.strings.substr(start, 0, 4) == b"\x89PNG",
             tf.strings.substr(start, 0, 4) == b"GIF8", tf.strings.substr(start, 0, 2) == b"BM",
             (tf.strings.substr(start, 0, 4) == b"RIFF") & (tf.strings.substr(start, 8, 4) == b"WEBP")]
    found = tf.stack(magic)
    return tf.where(tf.reduce_any(found), tf.cast(tf.argmax(tf.cast(found, tf.int32)), tf.int32), -1)


def _webp_size(start: tf.Tensor) -> tf.Tensor:
    chunk = tf.strings.substr(start, 12, 4)
    little = tf.constant(True)
    extended = tf.stack([1 + _number(_bytes(start, 27, 3), little), 1 + _number(_bytes(start, 24, 3), little)])
    lossy = tf.stack([_number(_bytes(start, 28, 2), little) % 16384, _number(_bytes(start, 26, 2), little) % 16384])
    bits = _number(_bytes(start, 21, 4), little)
    lossless = tf.stack([1 + tf.bitwise.right_shift(bits, 14) % 16384, 1 + bits % 16384])
    return tf.where(chunk == b"VP8X", extended, tf.where(chunk == b"VP8L", lossless, lossy))


def _bmp_side(start: tf.Tensor, pos: int) -> tf.Tensor:
    """A BMP header's signed 32-bit side (a negative height: rows stored top-down), as its length."""
    value = _number(_bytes(start, pos, 4), tf.constant(True))
    return tf.abs(tf.where(value >= 2**31, value - 2**32, value))


def stored_size(blob: tf.Tensor, start: tf.Tensor, kind: tf.Tensor) -> tf.Tensor:
    """[height, width] the header declares, before any pixel is decoded (0, 0 for another format)."""
    little, big = tf.constant(True), tf.constant(False)
    return tf.switch_case(tf.maximum(kind, 0) + tf.cast(kind < 0, tf.int32) * 5, [
        lambda: tf.io.extract_jpeg_shape(blob, output_type=tf.int64)[:2],
        lambda: tf.stack([_number(_bytes(start, 20, 4), big), _number(_bytes(start, 16, 4), big)]),
        lambda: tf.stack([_number(_bytes(start, 8, 2), little), _number(_bytes(start, 6, 2), little)]),
        lambda: tf.stack([_bmp_side(start, 22), _bmp_side(start, 18)]),
        lambda: _webp_size(start),
        lambda: tf.zeros([2], tf.int64)])


def exif_orientation(start: tf.Tensor) -> tf.Tensor:
    """The EXIF Orientation tag (1-8; 1 when there is none): in a JPEG's APP1 segment after "Exif\\0\\0", in a PNG's
    eXIf chunk; a TIFF header (II or MM), IFD0, and the tag among its entries."""
    jpeg = tf.strings.split(start, sep="Exif\x00\x00", maxsplit=1)
    png = tf.strings.split(start, sep="eXIf", maxsplit=1)
    tiff = tf.where(tf.size(jpeg) > 1, tf.strings.length(jpeg[0]) + 6,
                    tf.where(tf.size(png) > 1, tf.strings.length(png[0]) + 4, -1))
    little = tf.strings.substr(start, tf.maximum(tiff, 0), 2) == b"II"
    ifd = tf.cast(tf.maximum(tiff, 0), tf.int64) + _number(_bytes(start, tf.maximum(tiff, 0) + 4, 4), little)
    ifd = tf.minimum(ifd, HEAD)
    count = _number(_bytes(start, ifd, 2), little)
    entries = tf.reshape(_bytes(start, ifd + 2, 12 * IFD_ENTRIES), [IFD_ENTRIES, 12])
    tags = tf.where(little, entries[:, 0] + 256 * entries[:, 1], 256 * entries[:, 0] + entries[:, 1])
    values = tf.where(little, entries[:, 8] + 256 * entries[:, 9], 256 * entries[:, 8] + entries[:, 9])
    hit = (tags == ORIENTATION_TAG) & (tf.range(IFD_ENTRIES, dtype=tf.int64) < count)
    value = tf.where(tf.reduce_any(hit), tf.gather(values, tf.argmax(tf.cast(hit, tf.int32))), 1)
    return tf.cast(tf.where((tiff >= 0) & (value >= 1) & (value <= 8), value, 1), tf.int32)


def probe(blob: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(kind, [height, width] as displayed, orientation), read from the header alone."""
    start = head(blob)
    kind = image_kind(start)
    orientation = exif_orientation(start)
    size = stored_size(blob, start, kind)
    turned = orientation >= 5  # 5-8 turn the image a quarter: its sides swap
    return kind, tf.where(turned, tf.reverse(size, [0]), size), orientation


def _jpeg_ratio(size: tf.Tensor, fmt: ImageFormat) -> tf.Tensor:
    """0-3 for DCT scaling by 1, 2, 4, 8: the most that keeps at least the pixels the resize needs."""
    if fmt.size is None:
        return tf.constant(0)
    size = tf.cast(size, tf.float64)
    target = tf.constant(fmt.size, tf.float64)
    if fmt.resize == "stretch":
        need = target
    else:
        ratios = target / tf.maximum(size, 1.0)
        scale = tf.reduce_max(ratios) if fmt.resize == "crop" else tf.reduce_min(ratios)
        need = tf.math.ceil(size * scale)
    fold = tf.reduce_min(tf.math.floordiv(size, tf.maximum(need, 1.0)))
    return tf.reduce_sum(tf.cast(fold >= tf.constant([2.0, 4.0, 8.0], tf.float64), tf.int32))


def _decode(blob: tf.Tensor, start: tf.Tensor, kind: tf.Tensor, ratio: tf.Tensor, channels: int) -> tf.Tensor:
    """The decoded pixels as stored (not yet oriented), uint8, `channels` of them (0: the image's own)."""
    def jpeg():
        return tf.switch_case(ratio, [lambda r=r: tf.io.decode_jpeg(blob, channels=channels, ratio=r,
                                                                    dct_method="INTEGER_ACCURATE")
                                      for r in (1, 2, 4, 8)])

    def png():
        deep = _bytes(start, 24, 1)[0] == 16  # the IHDR's bit depth: 16-bit samples keep their top 8 bits
        return tf.cond(deep, lambda: tf.cast(tf.bitwise.right_shift(
            tf.io.decode_png(blob, channels=channels, dtype=tf.uint16), tf.constant(8, tf.uint16)), tf.uint8),
            lambda: tf.io.decode_png(blob, channels=channels))

    def other():
        return tf.io.decode_image(blob, channels=channels, expand_animations=False)

    return tf.switch_case(tf.minimum(kind, 2), [jpeg, png, other])


def _oriented(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """EXIF orientation applied, as Pillow's ImageOps.exif_transpose does it."""
    return tf.switch_case(orientation - 1, [
        lambda: image, lambda: tf.image.flip_left_right(image), lambda: tf.image.rot90(image, 2),
        lambda: tf.image.flip_up_down(image), lambda: tf.image.transpose(image), lambda: tf.image.rot90(image, 3),
        lambda: tf.image.rot90(tf.image.transpose(image), 2), lambda: tf.image.rot90(image, 1)])


def grey(image: tf.Tensor) -> tf.Tensor:
    """RGB to one channel by Pillow's "L" formula (L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded, in
    integers): a grey image stays exactly as it was."""
    rgb = tf.cast(image, tf.int32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) // 65536
    return tf.cast(luma, tf.uint8)[..., None]


def _own_channels(image: tf.Tensor) -> tf.Tensor:
    """An image's own channels, alpha dropped: grey (and grey with alpha) as 1, anything else as 3."""
    count = tf.shape(image)[-1]
    return tf.cond(count <= 2, lambda: image[..., :1], lambda: image[..., :3])


def pixels(blob: tf.Tensor, fmt: ImageFormat, max_pixels: int) -> tf.Tensor:
    """One encoded image to uint8 [H, W, C] in the format `fmt`: the whole preprocessing, as a graph. A format
    TensorFlow does not decode, or a size over `max_pixels`, fails (InvalidArgumentError) before decoding."""
    start = head(blob)
    kind, size, orientation = probe(blob)
    checks = [tf.debugging.assert_greater_equal(kind, 0, message="not a JPEG, PNG, GIF, BMP or WebP image"),
              tf.debugging.assert_less_equal(size[0] * size[1], tf.constant(max_pixels, tf.int64),
                                             message=f"declares more pixels than the limit of {max_pixels} "
                                                     "(data.max_image_pixels)")]
    with tf.control_dependencies(checks):
        decode_channels = 3 if fmt.channels else 0
        image = _decode(blob, start, kind, tf.where(kind == 0, _jpeg_ratio(size, fmt), 0), decode_channels)
    if fmt.channels is None:
        image = _own_channels(image)
    return from_array(_oriented(image, orientation), fmt)


def from_array(image: tf.Tensor, fmt: ImageFormat) -> tf.Tensor:
    """Decoded, upright uint8 pixels [h, w, c] (c: 1, or 3 for RGB) in the format `fmt`: the channels, then the size."""
    one = tf.shape(image)[-1] == 1
    if fmt.channels == 1:
        image = tf.cond(one, lambda: image[..., :1], lambda: grey(image[..., :3]))
    elif fmt.channels == 3:
        image = tf.cond(one, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    if fmt.size is None:
        return image
    height, width = fmt.size
    values = tf.cast(image, tf.float32)
    if fmt.resize == "crop":
        values = _centre_crop(values, height, width)
    if fmt.resize == "pad":
        values = _resize_to_fit_and_pad(values, height, width, fmt.interpolation)
    else:
        values = _resize(values, tf.constant([height, width]), fmt.interpolation)
    return tf.cast(tf.clip_by_value(tf.round(values), 0, 255), tf.uint8)


def _resize(image: tf.Tensor, size: tf.Tensor, interpolation: str) -> tf.Tensor:
    """To `size` with the filter, antialiased (the filter widened) when a side shrinks two-fold or more."""
    shrink = tf.reduce_max(tf.cast(tf.shape(image)[:2], tf.float32) / tf.cast(size, tf.float32))
    method = METHOD[interpolation]
    return tf.cond(shrink >= 2.0, lambda: tf.image.resize(image, size, method=method, antialias=True),
                   lambda: tf.image.resize(image, size, method=method))


def _centre_crop(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """The centre cut of `image` to the aspect ratio of height x width."""
    size = tf.cast(tf.shape(image)[:2], tf.float64)
    h, w = size[0], size[1]
    crop_w = tf.minimum(w, tf.round(h * width / height))
    crop_h = tf.minimum(h, tf.round(w * height / width))
    top, left = tf.math.floordiv(h - crop_h, 2), tf.math.floordiv(w - crop_w, 2)
    return tf.image.crop_to_bounding_box(image, *(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w)))


def _resize_to_fit_and_pad(image: tf.Tensor, height: int, width: int, interpolation: str) -> tf.Tensor:
    """Resized to fit inside height x width, then centred on black."""
    size = tf.cast(tf.shape(image)[:2], tf.float64)
    scale = tf.minimum(width / size[1], height / size[0])
    fit = tf.cast(tf.maximum(tf.round(size * scale), 1.0), tf.int32)
    image = _resize(image, fit, interpolation)
    return tf.image.pad_to_bounding_box(image, (height - fit[0]) // 2, (width - fit[1]) // 2, height, width)
