"""The one place that turns Parquet columns into image and label arrays (ingestion and prediction share it).

Accepted image columns: raw uint8 pixels (`fixed_size_binary` or `binary`, shape from the schema metadata
`image_shape` or `data.image_shape`), lists of numbers, encoded image bytes (PNG, JPEG, GIF, BMP, WebP: decoded
by tasks/decoding.py, of any size when `data.image_size` is set), and the Hugging Face image struct
`{bytes, path}`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.decoding import IMAGE_MAGIC, ImageFormat, decode_image, resize_array
from tasks.errors import PipelineError, first_line


def parquet_files(path: str | Path) -> list[str]:
    """A Parquet file, or the sorted part files of a directory (local, or a prefix in a bucket)."""
    from tasks import storage

    path = str(path)
    if storage.is_dir(path):
        files = [f for f in storage.find(path) if f.endswith(".parquet")]
        if not files:
            raise PipelineError(f"{path} holds no .parquet files: point at a Parquet file or a directory of part files")
        return files
    if not storage.exists(path):
        raise PipelineError(f"{path} does not exist: check the path")
    return [path]


def open_parquet(path: str | Path) -> pq.ParquetFile:
    from tasks import storage

    try:
        return pq.ParquetFile(str(path) if storage.is_local(str(path)) else storage.open_file(str(path)))
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(f"{path} is not a readable Parquet file ({first_line(exc)}): check the file") from None


def schema_metadata(schema: pa.Schema) -> dict[str, object]:
    """The JSON values of the schema's key-value metadata that tfpipe understands."""
    out: dict[str, object] = {}
    meta = schema.metadata or {}
    for key in (b"image_shape", b"label_names"):
        if key in meta:
            try:
                out[key.decode()] = json.loads(meta[key])
            except ValueError:
                pass
    return out


def normalise_shape(shape: list[int] | tuple[int, ...] | None) -> list[int] | None:
    if shape is None:
        return None
    shape = [int(s) for s in shape]
    return shape + [1] if len(shape) == 2 else shape


def check_columns(schema: pa.Schema, columns: list[str], where: str) -> None:
    for column in columns:
        if column not in schema.names:
            raise PipelineError(
                f"{where} has no column {column!r} (columns: {', '.join(schema.names)}): "
                f"set data.image_column / data.label_column to the right names")


def iter_parquet_batches(files: list[str], columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    for path in files:
        pf = open_parquet(path)
        check_columns(pf.schema_arrow, columns, str(path))
        try:
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)
        except pa.ArrowException as exc:
            raise PipelineError(f"{path} could not be read ({first_line(exc)}): check the file") from None



def _decode_encoded(blobs: list[bytes | None], shape: list[int] | None, where: str, fmt: ImageFormat) -> np.ndarray:
    """Encoded images (tasks/decoding.py): resized to fmt.size when set; else every one must have `shape` (or the
    first image's shape when none is set)."""
    images = []
    for i, blob in enumerate(blobs):
        row = f"{where}: row {i}"
        if blob is None:
            raise PipelineError(f"{row} has no image: drop empty rows before ingesting")
        img = decode_image(blob, row, fmt, shape)
        if shape is not None and len(shape) == 3 and list(img.shape) != shape:
            raise PipelineError(f"{row} decodes to {list(img.shape)}, expected {shape}: store every image with "
                                "the same channels (or set data.color_mode)")
        shape = shape or list(img.shape)
        images.append(img)
    return np.stack(images).astype(np.uint8)


def to_format(images: np.ndarray, fmt: ImageFormat | None) -> np.ndarray:
    """Raw pixel arrays resized (and their channels converted) to the format, when it asks for another shape."""
    if fmt is None:
        return images
    wanted_channels = fmt.channels or images.shape[-1]
    if fmt.size is None or (list(images.shape[1:3]) == list(fmt.size) and images.shape[-1] == wanted_channels):
        return images
    return np.stack([resize_array(image, fmt) for image in images]) if len(images) else images


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
                  fmt: ImageFormat | None = None) -> np.ndarray:
    """uint8 array [n, height, width, channels] from an image column, whatever its encoding; images of any size
    made the format's size (data.image_size, encoded or raw)."""
    fmt = fmt or ImageFormat()
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
        return decode_images(column.field("bytes"), shape, where, fmt)
    if pa.types.is_fixed_size_binary(kind):
        shape = _check_length(kind.byte_width, shape, where)
        data = np.frombuffer(column.buffers()[1], np.uint8, count=n * kind.byte_width, offset=column.offset * kind.byte_width)
        return to_format(data.reshape(n, *shape), fmt)
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
        return to_format(data.reshape(n, *shape), fmt)
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
        return to_format(arr.astype(np.uint8).reshape(n, *shape), fmt)
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


def check_numpy_images(x: np.ndarray, where: str) -> np.ndarray:
    """Keras-style image arrays [n, h, w] or [n, h, w, c] of pixel values -> uint8 [n, h, w, c]."""
    if x.dtype == object:
        raise PipelineError(f"{where}: holds Python objects, not numbers: save plain numeric arrays")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise PipelineError(f"{where}: shape {list(x.shape)} is not [n, height, width] or [n, height, width, channels]")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number):
            raise PipelineError(f"{where}: dtype {x.dtype} is not numeric")
        if x.size and (x.min() < 0 or x.max() > 255):
            raise PipelineError(f"{where}: pixel values outside 0..255: store uint8 pixels")
        x = x.astype(np.uint8)
    return x


def load_npz(path: str | Path, keys: tuple[str, ...], layout: str) -> dict[str, np.ndarray]:
    """The arrays `keys` of an .npz file. Nothing is unpickled: object arrays are refused. `layout` tells the user
    what the file should hold."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: {layout}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise PipelineError(f"{path} lacks {', '.join(missing)} (arrays: {', '.join(npz.files) or 'none'}): {layout}")
            return {k: npz[k] for k in keys}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise PipelineError(f"{path} holds object arrays, which are not loaded for safety: save plain "
                                "numeric arrays (np.savez with uint8 images and integer labels)") from None
        raise PipelineError(f"{path} is not a readable .npz file ({first_line(exc)}): check the file") from None
    except OSError as exc:
        raise PipelineError(f"{path} is not a readable .npz file ({first_line(exc)}): check the file") from None
