"""One encoded image (a file's bytes, or a Parquet cell) to uint8 pixels of the shape the dataset asks for.

Pillow opens lazily: the header's size is checked before any pixel is decoded (a decompression bomb, or an
image of the wrong size when no resizing is asked for, fails fast). Then EXIF orientation is applied, the mode
(L, LA, P, RGB, RGBA, CMYK, I;16, 1) converted to the colour mode, and the image resized to `data.image_size`:
`stretch` to the size, `crop` (the centre cut to the target's aspect ratio, then resized) or `pad` (resized to fit,
then padded with black), as Keras' `crop_to_aspect_ratio` / `pad_to_aspect_ratio`. A JPEG that shrinks a lot is
decoded at a fraction of its size first (`Image.draft`), which is much faster and looks the same.
"""

from __future__ import annotations

import io
import math

import numpy as np

from tasks.errors import PipelineError, first_line
from tasks.preprocess.image_format import (EXIF_ORIENTATION, GRAY_MODES, IMAGE_MAGIC, MAX_ENCODED_PIXELS, SWAPS_SIDES,
                                           ImageFormat, NotAnImage)


def open_image(blob: bytes, where: str):
    """The image behind `blob`, opened lazily (its header read, no pixel decoded); NotAnImage when the bytes are
    of no image format (a text file), PipelineError when they are a broken image."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # decode_image_sized checks the size itself, lower, naming the file
    try:
        return Image.open(io.BytesIO(blob))
    except UnidentifiedImageError as exc:
        if not blob.startswith(IMAGE_MAGIC):
            raise NotAnImage(f"{where} is not an image (no format Pillow knows): check the file") from None
        raise PipelineError(f"{where} is not a decodable image ({first_line(exc)}): check the file") from None
    except Exception as exc:
        raise PipelineError(f"{where} is not a decodable image ({first_line(exc)}): check the file") from None


def displayed_size(image) -> tuple[int, int]:
    """(height, width) once EXIF orientation is applied, from the header."""
    width, height = image.size
    try:
        turned = image.getexif().get(EXIF_ORIENTATION) in SWAPS_SIDES
    except Exception:  # a broken EXIF block: the image as stored
        turned = False
    return (width, height) if turned else (height, width)


def decode_image(blob: bytes, where: str, fmt: ImageFormat, expected: list[int] | None = None) -> np.ndarray:
    """uint8 [h, w, c] pixels of one encoded image. Without a target size, its header must declare `expected`
    (height, width) when given: a wrong size fails before decoding."""
    return decode_image_sized(blob, where, fmt, expected)[0]


def decode_image_sized(blob: bytes, where: str, fmt: ImageFormat,
                       expected: list[int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """decode_image's pixels, and the image's own (height, width) before any resize."""
    from PIL import ImageOps

    image = open_image(blob, where)
    height, width = displayed_size(image)
    if fmt.size is None and expected is not None and [height, width] != list(expected[:2]):
        raise PipelineError(f"{where} declares {height}x{width} pixels, expected {expected[0]}x{expected[1]}: it was "
                            "not decoded; set data.image_size to resize the images to one shape (or fix "
                            "data.image_shape)")
    if width * height > MAX_ENCODED_PIXELS:
        raise PipelineError(f"{where} declares {height}x{width} pixels, over the limit of {MAX_ENCODED_PIXELS} (a "
                            "decompression bomb?): it was not decoded")
    try:
        if fmt.size is not None and image.format == "JPEG":
            _draft(image, fmt, height, width)
        image = ImageOps.exif_transpose(image)
        image = _to_mode(image, fmt.channels)
        if fmt.size is not None:
            image = resized(image, fmt)
        pixels = np.asarray(image, dtype=np.uint8)
    except PipelineError:
        raise
    except Exception as exc:  # truncated data, a broken stream: Pillow raises OSError, SyntaxError, ValueError...
        raise PipelineError(f"{where} is not a decodable image ({first_line(exc)}): check the file") from None
    return (pixels[..., None] if pixels.ndim == 2 else pixels), (height, width)


def _draft(image, fmt: ImageFormat, height: int, width: int) -> None:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while keeping at least the pixels the resize needs."""
    target_h, target_w = fmt.size
    scale = {"stretch": None, "crop": max(target_h / height, target_w / width),
             "pad": min(target_h / height, target_w / width)}[fmt.resize]
    need_h, need_w = (target_h, target_w) if scale is None else (math.ceil(height * scale), math.ceil(width * scale))
    if displayed_size(image) != tuple(reversed(image.size)):  # stored turned a quarter: its sides swap
        need_h, need_w = need_w, need_h
    image.draft(None, (need_w, need_h))


def _to_mode(image, channels: int | None):
    """The image in L (1 channel) or RGB (3 channels); `None` keeps grey images grey and makes the rest RGB."""
    mode = image.mode
    if channels is None:
        channels = 1 if mode in GRAY_MODES else 3
    if mode.startswith("I;16") or mode in ("I", "F"):  # 16-bit or wider grey: the top 8 bits
        image = _eight_bit(image)
        mode = image.mode
    if channels == 1:
        return image if mode == "L" else image.convert("L")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow's advice for palette transparency given as bytes
    return image if image.mode == "RGB" else image.convert("RGB")


def _eight_bit(image):
    from PIL import Image

    values = np.asarray(image)
    top = values.max(initial=0)
    shift = 8 if top > 255 else 0  # 16-bit data in a 32-bit mode keeps its range; 8-bit data its values
    return Image.fromarray((values.astype(np.int64) >> shift).clip(0, 255).astype(np.uint8), "L")


RESAMPLING = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS", "area": "BOX"}


def resized(image, fmt: ImageFormat):
    """`image` at fmt.size: stretched, centre-cropped to the aspect ratio then resized, or resized to fit and
    padded with black. Pillow's filters widen when shrinking, so a reduction is antialiased."""
    from PIL import Image

    resample = getattr(Image.Resampling, RESAMPLING[fmt.interpolation])
    target_h, target_w = fmt.size
    width, height = image.size
    if fmt.resize == "crop":
        crop_w, crop_h = min(width, round(height * target_w / target_h)), min(height, round(width * target_h / target_w))
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return image.resize((target_w, target_h), resample, box=(left, top, left + crop_w, top + crop_h))
    if fmt.resize == "pad":
        scale = min(target_w / width, target_h / height)
        fit_w, fit_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = Image.new(image.mode, (target_w, target_h))
        canvas.paste(image.resize((fit_w, fit_h), resample), ((target_w - fit_w) // 2, (target_h - fit_h) // 2))
        return canvas
    return image.resize((target_w, target_h), resample)


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


def resize_array(pixels: np.ndarray, fmt: ImageFormat) -> np.ndarray:
    """Raw uint8 pixels [h, w, c] (a source stored as arrays) to the format's size and channels."""
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image = _to_mode(image, fmt.channels)
    out = np.asarray(resized(image, fmt) if fmt.size else image, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def to_format(images: np.ndarray, fmt: ImageFormat | None) -> np.ndarray:
    """Raw pixel arrays resized (and their channels converted) to the format, when it asks for another shape."""
    if fmt is None:
        return images
    wanted_channels = fmt.channels or images.shape[-1]
    if fmt.size is None or (list(images.shape[1:3]) == list(fmt.size) and images.shape[-1] == wanted_channels):
        return images
    return np.stack([resize_array(image, fmt) for image in images]) if len(images) else images
