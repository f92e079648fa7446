"""The one place that turns Parquet columns into image and label arrays (ingestion and prediction share it).

Accepted image columns: raw uint8 pixels (`fixed_size_binary` or `binary`, shape from the schema metadata
`image_shape` or `data.image_shape`), lists of numbers, encoded image bytes (PNG, JPEG, GIF, BMP, WebP: decoded
by tasks/preprocess/decode.py, of any size when `data.image_size` is set), and the Hugging Face image struct
`{bytes, path}`.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from tasks.errors import PipelineError
from tasks.preprocess.decode import decode_many, to_format
from tasks.preprocess.image_format import IMAGE_MAGIC, ImageFormat


def normalise_shape(shape: list[int] | tuple[int, ...] | None) -> list[int] | None:
    if shape is None:
        return None
    shape = [int(s) for s in shape]
    return shape + [1] if len(shape) == 2 else shape


def _decode_encoded(blobs: list[bytes | None], shape: list[int] | None, where: str, fmt: ImageFormat) -> np.ndarray:
    """Encoded images (tasks/preprocess/decode.py), decoded together: resized to fmt.size when set; else every one
    must have `shape` (or the first image's shape when none is set)."""
    rows = [f"{where}: row {i}" for i in range(len(blobs))]
    empty = [row for row, blob in zip(rows, blobs) if blob is None]
    if empty:
        raise PipelineError(f"{empty[0]} has no image: drop empty rows before ingesting")
    images = []
    for row, result in zip(rows, decode_many(blobs, rows, fmt)):
        if isinstance(result, PipelineError):
            raise result
        img = result[0]
        if fmt.size is None and shape is not None and list(img.shape[:2]) != list(shape[:2]):
            raise PipelineError(f"{row} is {img.shape[0]}x{img.shape[1]} pixels, expected {shape[0]}x{shape[1]}: set "
                                "data.image_size to resize the images to one shape (or fix data.image_shape)")
        if shape is not None and len(shape) == 3 and list(img.shape) != shape:
            raise PipelineError(f"{row} decodes to {list(img.shape)}, expected {shape}: store every image with "
                                "the same channels (or set data.color_mode)")
        shape = shape or list(img.shape)
        images.append(img)
    return np.stack(images).astype(np.uint8)


def _check_length(length: int, shape: list[int] | None, where: str) -> list[int]:
    if shape is None:
        side = math.isqrt(length)
        if side * side != length:
            raise PipelineError(f"{where}: images of {length} values and no image shape: set data.image_shape "
                                "or the schema metadata 'image_shape'")
        return [side, side, 1]
    if math.prod(shape) != length:
        raise PipelineError(f"{where}: image has {length} values but the image shape {shape} needs "
                            f"{math.prod(shape)}: fix data.image_shape or the image bytes")
    return shape


def decode_images(column: pa.Array | pa.ChunkedArray, shape: list[int] | None, where: str,
                  fmt: ImageFormat | None = None, arrays: ImageFormat | None = None) -> np.ndarray:
    """uint8 array [n, height, width, channels] from an image column, whatever its encoding; images of any size
    made the format's size (data.image_size, encoded or raw)."""
    fmt = fmt or ImageFormat()
    arrays = arrays or fmt  # raw pixels (prediction: as serving_default takes them), encoded images as `fmt`
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    shape = normalise_shape(shape)
    n = len(column)
    if column.null_count:
        raise PipelineError(f"{where}: {column.null_count} image(s) are null: drop empty rows before ingesting")
    kind = column.type
    if pa.types.is_struct(kind):
        if kind.get_field_index("bytes") < 0:
            raise PipelineError(f"{where}: image struct has no 'bytes' field: expected the Hugging Face image struct {{bytes, path}}")
        return decode_images(column.field("bytes"), shape, where, fmt, arrays)
    if pa.types.is_fixed_size_binary(kind):
        shape = _check_length(kind.byte_width, shape, where)
        data = np.frombuffer(column.buffers()[1], np.uint8, count=n * kind.byte_width, offset=column.offset * kind.byte_width)
        return to_format(data.reshape(n, *shape), arrays)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        if n == 0:
            return np.zeros((0, *(shape or [0, 0, 1])), np.uint8)
        first = column[0].as_py()
        if first.startswith(IMAGE_MAGIC):
            return _decode_encoded(column.to_pylist(), shape, where, fmt)
        offset_type = np.int64 if pa.types.is_large_binary(kind) else np.int32
        offsets = np.frombuffer(column.buffers()[1], offset_type)[column.offset: column.offset + n + 1]
        lengths = np.diff(offsets)
        bad = np.flatnonzero(lengths != lengths[0])
        if bad.size:
            raise PipelineError(f"{where}: row {bad[0]} has {lengths[bad[0]]} image bytes, row 0 has {lengths[0]}: "
                                "every image must have the same number of pixels")
        shape = _check_length(int(lengths[0]), shape, where)
        data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]: offsets[-1]]
        return to_format(data.reshape(n, *shape), arrays)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        values = column.flatten()
        while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type) or pa.types.is_large_list(values.type):
            values = values.flatten()
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            raise PipelineError(f"{where}: image lists hold {values.type}, expected numbers")
        if n == 0:
            return np.zeros((0, *(shape or [0, 0, 1])), np.uint8)
        if len(values) % n:
            raise PipelineError(f"{where}: image lists have different lengths: every image must have the same number of pixels")
        per = len(values) // n
        lengths = np.asarray(column.value_lengths()) if not pa.types.is_fixed_size_list(kind) else None
        if lengths is not None and (lengths != per).any():
            row = int(np.flatnonzero(lengths != per)[0])
            raise PipelineError(f"{where}: row {row} has {lengths[row]} pixel values, others {per}: "
                                "every image must have the same number of pixels")
        shape = _check_length(per, shape, where)
        arr = values.to_numpy(zero_copy_only=False)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise PipelineError(f"{where}: pixel values outside 0..255: store uint8 pixels")
        return to_format(arr.astype(np.uint8).reshape(n, *shape), arrays)
    raise PipelineError(f"{where}: image column of type {kind} is not supported: use raw uint8 bytes, "
                        "a list of numbers, or encoded image bytes (PNG, JPEG, GIF, BMP, WebP)")


def decode_labels(column: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """int64 labels; rejects non-integers, nulls and negatives."""
    if not pa.types.is_integer(column.type):
        raise PipelineError(f"{where}: labels are {column.type}, expected integers: store class indices 0..N-1")
    if column.null_count:
        raise PipelineError(f"{where}: {column.null_count} label(s) are null: drop unlabelled rows")
    labels = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise PipelineError(f"{where}: negative label {labels.min()}: labels must be class indices 0..N-1")
    return labels
