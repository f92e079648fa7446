"""The one preprocessing: encoded images to the model's uint8 pixels, in TensorFlow ops. Ingest (a folder's files,
encoded images in Parquet), prediction on image files and the SavedModel's `serve_bytes` all run these functions,
so what the model receives cannot differ between them (tasks/preprocess/decode.py runs them on many files at once).

The steps, in order:
- `probe`, on a batch of files at once (their first bytes only): the format (JPEG, PNG, GIF's first frame, BMP,
  WebP; any other is refused here, and ingest decodes it with Pillow, then runs the steps after decoding,
  `from_array`), the size the header declares and the EXIF orientation (a JPEG's APP1, a PNG's eXIf chunk);
- `decode`, one image: the declared size checked against `data.max_image_pixels` before any pixel is decoded (a
  decompression bomb costs nothing); a JPEG decoded with libjpeg's accurate DCT (Pillow's pixels exactly), at 1/2,
  1/4 or 1/8 of its size when it shrinks that much (the decoder's DCT scaling: a 24 MP photo costs a fraction of
  its pixels); a 16-bit PNG by its bit depth, the top 8 bits of every value, whatever the image's own range; the
  orientation applied;
- `from_array`: the channels, RGB or grey by Pillow's "L" formula (ITU-R 601-2 luma, in integers); the size:
  stretch, centre crop or pad to `data.image_size` with `data.interpolation`, antialiased where a side shrinks
  two-fold or more: by the JPEG decoder's DCT scaling, then a box filter by the whole factor left, then the
  filter itself over less than a two-fold reduction.
"""

from __future__ import annotations

import tensorflow as tf

from tasks.preprocess.image_format import ImageFormat

KINDS = ("JPEG", "PNG", "GIF", "BMP", "WebP")  # what TensorFlow decodes, by index; -1: another format
HEAD = 1 << 16  # the bytes at a file's start that hold its size and its EXIF orientation
SEGMENTS = 4  # a JPEG's APP segments walked for its EXIF
IFD_ENTRIES = 64  # EXIF entries looked at for the orientation (cameras put it among the first dozen)
ORIENTATION_TAG = 0x0112
METHOD = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "lanczos3",
          "area": "area"}


# ------------------------------------------------------------------------------------------ headers (batched)

def _head(blobs: tf.Tensor) -> tf.Tensor:
    """Each file's first HEAD bytes, followed by zero bytes: every header read below (at most 1 KiB from a
    position clamped to HEAD) stays inside, however short the file."""
    return tf.strings.join([tf.strings.substr(blobs, 0, HEAD), tf.constant(b"\0" * (HEAD + 1024))])


def _bytes(heads: tf.Tensor, pos, count: int) -> tf.Tensor:
    """[N, count] bytes of each head from its `pos` (clamped into the head), as int64."""
    pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, HEAD) + tf.zeros_like(heads, tf.int64)
    raw = tf.io.decode_raw(tf.strings.substr(heads, pos, tf.fill(tf.shape(pos), tf.constant(count, tf.int64))),
                           tf.uint8)
    return tf.reshape(tf.cast(raw, tf.int64), [-1, count])


def _number(raw: tf.Tensor, little) -> tf.Tensor:
    """[N] unsigned integers from [N, k] bytes, little- or big-endian (`little`: [N] or a bool)."""
    count = raw.shape[-1]
    weights = tf.bitwise.left_shift(tf.constant(1, tf.int64), 8 * tf.range(count, dtype=tf.int64))
    little = tf.cast(little, tf.bool) | tf.zeros(tf.shape(raw)[:1], tf.bool)
    return tf.reduce_sum(raw * tf.where(little[:, None], weights, tf.reverse(weights, [0])), axis=-1)


def _kinds(heads: tf.Tensor) -> tf.Tensor:
    """[N] indices into KINDS from the magic bytes; -1 for any other format (or no image at all)."""
    found = tf.stack([tf.strings.substr(heads, 0, 3) == b"\xff\xd8\xff", tf.strings.substr(heads, 0, 4) == b"\x89PNG",
                      tf.strings.substr(heads, 0, 4) == b"GIF8", tf.strings.substr(heads, 0, 2) == b"BM",
                      (tf.strings.substr(heads, 0, 4) == b"RIFF") & (tf.strings.substr(heads, 8, 4) == b"WEBP")], -1)
    return tf.where(tf.reduce_any(found, -1), tf.cast(tf.argmax(tf.cast(found, tf.int32), -1), tf.int32), -1)


def _jpeg_exif(heads: tf.Tensor) -> tf.Tensor:
    """Where each JPEG's EXIF TIFF header starts (-1: none), walking its first SEGMENTS segments marker to marker:
    the APP1 "Exif" segment, which the standard puts first (after a JFIF APP0 at most)."""
    position = tf.fill(tf.shape(heads), tf.constant(2, tf.int64))
    tiff = tf.fill(tf.shape(heads), tf.constant(-1, tf.int64))
    for _ in range(SEGMENTS):
        marker = _bytes(heads, position, 4)
        ok = (marker[:, 0] == 0xFF) & (marker[:, 1] >= 0xE0) & (marker[:, 1] <= 0xEF) & (position < HEAD)
        exif = tf.strings.substr(heads, tf.minimum(position + 4, HEAD), tf.fill(tf.shape(position), tf.constant(
            6, tf.int64))) == b"Exif\x00\x00"
        tiff = tf.where((tiff < 0) & ok & (marker[:, 1] == 0xE1) & exif, position + 10, tiff)
        position = tf.where(ok, position + 2 + _number(marker[:, 2:4], tf.constant(False)), tf.constant(HEAD, tf.int64))
    return tiff


def _webp_sizes(heads: tf.Tensor) -> tf.Tensor:
    chunk = tf.strings.substr(heads, 12, 4)
    little = tf.constant(True)
    extended = tf.stack([1 + _number(_bytes(heads, 27, 3), little), 1 + _number(_bytes(heads, 24, 3), little)], -1)
    lossy = tf.stack([_number(_bytes(heads, 28, 2), little) % 16384, _number(_bytes(heads, 26, 2), little) % 16384],
                     -1)
    bits = _number(_bytes(heads, 21, 4), little)
    lossless = tf.stack([1 + tf.bitwise.right_shift(bits, 14) % 16384, 1 + bits % 16384], -1)
    return tf.where((chunk == b"VP8X")[:, None], extended, tf.where((chunk == b"VP8L")[:, None], lossless, lossy))


def _bmp_side(heads: tf.Tensor, pos: int) -> tf.Tensor:
    """A BMP header's signed 32-bit side (a negative height: rows stored top-down), as its length."""
    value = _number(_bytes(heads, pos, 4), tf.constant(True))
    return tf.abs(tf.where(value >= 2**31, value - 2**32, value))


def _orientations(heads: tf.Tensor, kinds: tf.Tensor, jpeg_tiff: tf.Tensor) -> tf.Tensor:
    """[N] EXIF Orientation tags (1-8; 1 when there is none), from a TIFF header (II or MM), IFD0 and its entries;
    a PNG's TIFF header is its eXIf chunk's data."""
    png = tf.strings.split(tf.where(kinds == 1, heads, ""), sep="eXIf", maxsplit=1)
    before = tf.gather(png.values, png.row_starts())  # each head up to its eXIf chunk's type
    png_tiff = tf.where(png.row_lengths() > 1, tf.strings.length(before, unit="BYTE") + 4, -1)
    tiff = tf.where(kinds == 0, jpeg_tiff, tf.where(kinds == 1, tf.cast(png_tiff, tf.int64), -1))
    start = tf.maximum(tiff, 0)
    little = tf.strings.substr(heads, start, tf.fill(tf.shape(start), tf.constant(2, tf.int64))) == b"II"
    ifd = tf.minimum(start + _number(_bytes(heads, start + 4, 4), little), HEAD)
    count = _number(_bytes(heads, ifd, 2), little)
    entries = tf.reshape(_bytes(heads, ifd + 2, 12 * IFD_ENTRIES), [-1, IFD_ENTRIES, 12])
    le = little[:, None]
    tags = tf.where(le, entries[..., 0] + 256 * entries[..., 1], 256 * entries[..., 0] + entries[..., 1])
    values = tf.where(le, entries[..., 8] + 256 * entries[..., 9], 256 * entries[..., 8] + entries[..., 9])
    hit = (tags == ORIENTATION_TAG) & (tf.range(IFD_ENTRIES, dtype=tf.int64)[None] < count[:, None])
    value = tf.where(tf.reduce_any(hit, -1), tf.gather(values, tf.argmax(tf.cast(hit, tf.int32), -1), batch_dims=1), 1)
    return tf.cast(tf.where((tiff >= 0) & (value >= 1) & (value <= 8), value, 1), tf.int32)


def probe(blobs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """For a batch of encoded files [N], from their first bytes alone: kinds [N] (index into KINDS, -1: another
    format), sizes [N, 2] as displayed (height, width once oriented; 0, 0 for a JPEG, whose size `decode` reads
    with libjpeg, and for another format) and EXIF orientations [N]."""
    heads = _head(blobs)
    kinds = _kinds(heads)
    big, little = tf.constant(False), tf.constant(True)
    candidates = tf.stack([
        tf.zeros_like(_webp_sizes(heads)),
        tf.stack([_number(_bytes(heads, 20, 4), big), _number(_bytes(heads, 16, 4), big)], -1),
        tf.stack([_number(_bytes(heads, 8, 2), little), _number(_bytes(heads, 6, 2), little)], -1),
        tf.stack([_bmp_side(heads, 22), _bmp_side(heads, 18)], -1),
        _webp_sizes(heads)], 1)
    sizes = tf.where((kinds >= 0)[:, None], tf.gather(candidates, tf.maximum(kinds, 0), batch_dims=1), 0)
    orientations = _orientations(heads, kinds, _jpeg_exif(heads))
    turned = (orientations >= 5)[:, None]  # 5-8 turn the image a quarter: its sides swap
    return kinds, tf.where(turned, tf.reverse(sizes, [-1]), sizes), orientations


# ------------------------------------------------------------------------------------------ one image

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


def _oriented(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """EXIF orientation applied, as Pillow's ImageOps.exif_transpose does it."""
    return tf.switch_case(orientation - 1, [
        lambda: image, lambda: tf.image.flip_left_right(image), lambda: tf.image.rot90(image, 2),
        lambda: tf.image.flip_up_down(image), lambda: tf.image.transpose(image), lambda: tf.image.rot90(image, 3),
        lambda: tf.image.rot90(tf.image.transpose(image), 2), lambda: tf.image.rot90(image, 1)])


def _limit(size: tf.Tensor, fmt: ImageFormat) -> tf.Operation:
    return tf.raw_ops.Assert(condition=size[0] * size[1] <= fmt.max_pixels, data=[tf.constant(
        f"declares more pixels than the limit of {fmt.max_pixels} (data.max_image_pixels)")])


def decode(blob: tf.Tensor, kind: tf.Tensor, size: tf.Tensor, orientation: tf.Tensor,
           fmt: ImageFormat) -> tuple[tf.Tensor, tf.Tensor]:
    """One encoded image, with what `probe` read of it, to (uint8 [H, W, C] in the format `fmt`, its own [height,
    width] as displayed). A format TensorFlow does not decode, or a size over fmt.max_pixels, fails
    (InvalidArgumentError) before decoding."""
    channels = 3 if fmt.channels else 0

    def jpeg():  # libjpeg reads the size from the header, wherever the frame header is
        stored = tf.io.extract_jpeg_shape(blob, output_type=tf.int64)[:2]
        shown = tf.where(orientation >= 5, tf.reverse(stored, [0]), stored)
        with tf.control_dependencies([_limit(shown, fmt)]):
            return tf.switch_case(_jpeg_ratio(shown, fmt), [
                lambda r=r: tf.io.decode_jpeg(blob, channels=channels, ratio=r, dct_method="INTEGER_ACCURATE")
                for r in (1, 2, 4, 8)]), shown

    def png():  # as 16-bit samples: an 8-bit PNG's come back exactly, a 16-bit PNG's keep their top 8 bits
        wide = tf.io.decode_png(blob, channels=channels, dtype=tf.uint16)
        return tf.cast(tf.bitwise.right_shift(wide, tf.constant(8, tf.uint16)), tf.uint8)

    def other():
        known = tf.raw_ops.Assert(condition=kind >= 0, data=[tf.constant("not a JPEG, PNG, GIF, BMP or WebP image")])
        with tf.control_dependencies([known, _limit(size, fmt)]):
            return tf.cond(kind == 1, png, lambda: tf.io.decode_image(blob, channels=channels,
                                                                       expand_animations=False)), size

    image, shown = tf.cond(kind == 0, jpeg, other)
    if fmt.channels is None:  # the image's own: grey (and grey with alpha) as 1, anything else as 3
        image = tf.cond(tf.shape(image)[-1] <= 2, lambda: image[..., :1], lambda: image[..., :3])
    return from_array(_oriented(image, orientation), fmt), shown


def pixels(blobs: tf.Tensor, fmt: ImageFormat) -> tf.Tensor:
    """A batch of encoded images [N] to uint8 [N, H, W, C] in `fmt` (which fixes H, W and C): the serving graph's
    whole preprocessing."""
    kinds, sizes, orientations = probe(blobs)
    shape = [*fmt.size, fmt.channels]
    return tf.map_fn(lambda item: decode(*item, fmt)[0], (blobs, kinds, sizes, orientations),
                     fn_output_signature=tf.TensorSpec(shape, tf.uint8))


# ------------------------------------------------------------------------------------------ after decoding

def grey(image: tf.Tensor) -> tf.Tensor:
    """RGB to one channel by Pillow's "L" formula (L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded, in
    integers): a grey image stays exactly as it was."""
    rgb = tf.cast(image, tf.int32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) // 65536
    return tf.cast(luma, tf.uint8)[..., None]


def from_array(image: tf.Tensor, fmt: ImageFormat) -> tf.Tensor:
    """Decoded, upright uint8 pixels [h, w, c] (c: 1, or 3 for RGB) in the format `fmt`: the channels, then the
    size."""
    known = image.shape[-1]  # static after a decode to 3 channels: no condition in the graph then
    one = tf.shape(image)[-1] == 1
    if fmt.channels == 1:
        image = grey(image) if known == 3 else tf.cond(one, lambda: image[..., :1], lambda: grey(image[..., :3]))
    elif fmt.channels == 3 and known != 3:
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
    """To `size` with the filter. A side that shrinks two-fold or more is first box-filtered ("area") by its whole
    factor, so that the filter is left less than a two-fold reduction: antialiased, at a fraction of the cost of
    widening the filter itself (bench.folders). `nearest` keeps its hard edges: no box filter."""
    method = METHOD[interpolation]
    if method in ("nearest", "area"):
        return tf.image.resize(image, size, method=method)
    current = tf.cast(tf.shape(image)[:2], tf.float32)
    factor = tf.maximum(tf.floor(current / tf.cast(size, tf.float32)), 1.0)
    image = tf.image.resize(image, tf.cast(tf.math.ceil(current / factor), tf.int32), method="area")
    return tf.image.resize(image, size, method=method)


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
