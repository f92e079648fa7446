"""Keras-style image arrays: an `.npz` source (x_train, y_train, x_test, y_test, as keras.datasets has them) and the
checks every array of pixels and labels goes through. An `.npz` cannot stream: NumPy reads each array of the zip
archive whole, so an npz input takes its arrays' size in memory (it is meant for small datasets)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline_config import DataConfig
from tasks.data.streams import SPLITS, Batch, Source, SplitStream
from tasks.errors import PipelineError, first_line
from tasks.preprocess.decode import to_format
from tasks.preprocess.image_format import ImageFormat

NPZ_LAYOUT = "data.source=npz:PATH needs an .npz file with x_train, y_train, x_test, y_test (keras.datasets layout)"


def npz_source(path: Path, cfg: DataConfig, fmt: ImageFormat) -> Source:
    arrays = load_npz(path, ("x_train", "y_train", "x_test", "y_test"), NPZ_LAYOUT)
    splits = {}
    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        where = f"{path} x_{split}/y_{split}"
        if len(x) != len(y):
            raise PipelineError(f"{where}: {len(x)} images but {len(y)} labels: x and y must have the same length")
        y = integer_labels(y, where)
        n = min(len(x), cfg.limit) if cfg.limit else len(x)
        splits[split] = SplitStream(array_batches(x[:n], y[:n], cfg.ingest_batch_rows, where, fmt), n)
    return Source(splits, None, f"npz:{path}")


def integer_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.dtype == object or not np.issubdtype(y.dtype, np.integer):
        if y.dtype != object and np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise PipelineError(f"{where}: labels are {y.dtype}, expected integers: store class indices 0..N-1")
    y = y.reshape(-1).astype(np.int64)
    if y.size and y.min() < 0:
        raise PipelineError(f"{where}: negative label {y.min()}: labels must be class indices 0..N-1")
    return y


def array_batches(x: np.ndarray, y: np.ndarray | None, rows: int, where: str,
                  fmt: ImageFormat | None = None) -> Iterator[Batch]:
    """Keras-style image arrays (and labels, when given), `rows` at a time, in the format when given."""
    for start in range(0, len(x), rows):
        at = f"{where} rows {start}..{min(start + rows, len(x)) - 1}"
        labels = None if y is None else y[start: start + rows]
        yield Batch(to_format(check_numpy_images(x[start: start + rows], at), fmt), labels, start, at)


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
