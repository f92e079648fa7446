"""The sources ingest reads (`data.source`): which kind it is, its labelled train and test splits as streams of row
batches (`open_source`), and the hash that identifies its content (`source_hash`), cheap enough for every run.

The kinds live beside this module: Parquet (and the embedded MNIST, which is Parquet) in parquet.py, `.npz` in
arrays.py, TFDS in tfds.py, folders of photos in folders.py. Each batch comes with where it is ("PATH rows A..B")
for error messages, and with `data.split_key`'s column when set (the validation split hashes it instead of the
row index). Memory is bounded by the batch, not the data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline_config import DataConfig
from tasks.data.arrays import NPZ_LAYOUT, npz_source
from tasks.data.columns import normalise_shape
from tasks.data.folders import folder_hash, folder_source
from tasks.data.parquet import parquet_files, parquet_identity, parquet_source, split_paths
from tasks.data.streams import Source
from tasks.data.tfds import tfds_identity, tfds_source
from tasks.errors import PipelineError
from tasks.preprocess.image_format import configured_channels, image_format
from tasks.store import storage

EMBEDDED_MNIST = Path(__file__).resolve().parents[2] / "data" / "mnist"
MNIST_SHAPE = [28, 28, 1]


def scheme(source: str) -> tuple[str, str]:
    if source == "mnist":
        return "mnist", str(EMBEDDED_MNIST)
    kind, _, rest = source.partition(":")
    return kind, rest


def open_source(cfg: DataConfig) -> Source:
    kind, where = scheme(cfg.source)
    if cfg.split_key and kind not in ("mnist", "parquet"):
        raise PipelineError(f"data.split_key={cfg.split_key!r} needs a Parquet source (a column to hash); "
                            f"{cfg.source} has none: unset it")
    if kind != "folder" and cfg.labels_file:
        raise PipelineError(f"data.labels_file labels a folder source; {cfg.source} has its labels: unset it")
    if kind == "folder":
        return folder_source(where, cfg)
    fmt = image_format(cfg, configured_channels(cfg))  # auto: each image keeps its own
    if kind in ("mnist", "parquet"):
        source = parquet_source(where, cfg, fmt)
        if kind == "mnist":
            source.description = "mnist (embedded Parquet, data/mnist)"
    elif kind == "npz":
        source = npz_source(Path(where), cfg, fmt)
    else:
        source = tfds_source(where, cfg, fmt)
    source.report["image_format"] = fmt.settings()
    return source


def source_hash(cfg: DataConfig) -> tuple[str, str]:
    """(hash, method) identifying the source's content, cheap enough for every run. Parquet: each file's size,
    modification time and footer metadata (row groups, schema, statistics), or with `data.verify_source: full`
    every byte; npz: every byte (the format is small by nature); TFDS: the prepared files' names and sizes; a
    folder: its listing (folders.py)."""
    kind, where = scheme(cfg.source)
    if kind == "folder":
        return folder_hash(where, cfg)
    if kind in ("mnist", "parquet"):
        files = [f for p in split_paths(where).values() for f in parquet_files(p)]
        if cfg.verify_source == "full" or kind == "mnist":  # the embedded copy is small: hashed whole, the same
            # fingerprint in every checkout (file times differ from one clone to the next)
            return (_digest(f"{storage.relative_to(f, where)}:{storage.sha256(f)}" for f in files),
                    "sha256 of every file")
        return (_digest(parquet_identity(f, where) for f in files),
                "file size, modification time (ETag in a bucket) and Parquet footer")
    if kind == "npz":
        path = Path(where)
        if not path.is_file():
            raise PipelineError(f"{path} does not exist: {NPZ_LAYOUT}")
        return _digest([f"{path.name}:{storage.sha256(str(path))}"]), "sha256 of the file"
    return _digest(tfds_identity(where, cfg)), "TFDS version and prepared file sizes"


def _digest(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(f"{part}\n".encode())
    return digest.hexdigest()


def expected_shape(cfg: DataConfig) -> list[int] | None:
    """The shape data.image_size (with an explicit color_mode, its channels) or data.image_shape promises, as
    [height, width] or [height, width, channels]."""
    if cfg.image_size:
        channels = configured_channels(cfg)
        return [*cfg.image_size, *([channels] if channels else [])]
    return normalise_shape(cfg.image_shape) if cfg.image_shape else None


def known_image_shape(cfg: DataConfig) -> list[int] | None:
    """The image shape before any row is read: from data.image_size or data.image_shape (three channels when the
    colour mode is still to be found: the layer stack builds the same), or the embedded MNIST's; else None."""
    shape = expected_shape(cfg)
    if shape is not None:
        return shape if len(shape) == 3 else [*shape, 3]
    return MNIST_SHAPE if cfg.source == "mnist" else None
