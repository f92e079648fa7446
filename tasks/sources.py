"""Every input of images, read as streams of row batches so that memory is bounded by the batch, not the data:
the one reader shared by ingest (`open_source`: labelled train and test splits) and prediction
(`read_images`: any input, labels or not).

Parquet streams row group by row group (`ParquetFile.iter_batches`), TFDS streams through its `tf.data`
pipeline, embedded MNIST is Parquet, a cache split (`cache:FINGERPRINT[/SPLIT]`) streams its TFRecord shards. An
`.npz` cannot stream: NumPy reads each array of the zip archive whole, so an npz input takes its arrays' size in
memory (it is meant for small, Keras-style datasets).

Each batch comes with where it is ("PATH rows A..B") for error messages, and with the other columns asked for:
`data.split_key` for ingest (the validation split hashes it instead of the row index), `predict.key_columns`
for prediction (passed through to the output).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline_config import DataConfig, PipelineConfig
from tasks import storage
from tasks.artifacts import CACHE_PREFIX, local_dataset, resolve_cache_ref
from tasks.decoding import ImageFormat
from tasks.errors import PipelineError, first_line
from tasks.folders import (configured_channels, file_batches, folder_hash, folder_source, image_files,
                           image_format)
from tasks.streams import Batch, Source, SplitStream
from tasks.images import (check_numpy_images, decode_images, decode_labels, iter_parquet_batches, load_npz,
                          normalise_shape, open_parquet, parquet_files, schema_metadata, to_format)

EMBEDDED_MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist"
NPZ_LAYOUT = "data.source=npz:PATH needs an .npz file with x_train, y_train, x_test, y_test (keras.datasets layout)"
SPLITS = ("train", "test")


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
        source = _parquet_source(where, cfg, fmt)
        if kind == "mnist":
            source.description = "mnist (embedded Parquet, data/mnist)"
    elif kind == "npz":
        source = _npz_source(Path(where), cfg, fmt)
    else:
        source = _tfds_source(where, cfg, fmt)
    source.report["image_format"] = fmt.settings()
    return source


# ------------------------------------------------------------------------------------------------ Parquet

def split_paths(directory: str) -> dict[str, str]:
    """The train and test parts of a Parquet source: `train.parquet`/`test.parquet` or `train/`/`test/`, in a
    local directory or under a bucket prefix."""
    fs, p = storage.filesystem(directory)
    layout = ("data.source=parquet:PATH needs a directory with train.parquet and test.parquet (or train/ and "
              "test/ directories)")
    if not fs.exists(p):
        raise PipelineError(f"{directory} does not exist: {layout}")
    if not fs.isdir(p):
        raise PipelineError(f"{directory} is not a directory: {layout}")
    paths = {}
    for split in SPLITS:
        for candidate in (storage.join(directory, f"{split}.parquet"), storage.join(directory, split)):
            if storage.exists(candidate):
                paths[split] = candidate
                break
        else:
            raise PipelineError(f"{directory} has no {split}.parquet or {split}/ directory: add the {split} split")
    return paths


def _parquet_source(directory: str, cfg: DataConfig, fmt: ImageFormat) -> Source:
    splits, label_names = {}, None
    for split, path in split_paths(directory).items():
        files = parquet_files(path)
        meta = schema_metadata(open_parquet(files[0]).schema_arrow)
        label_names = label_names or meta.get("label_names")
        total = sum(open_parquet(f).metadata.num_rows for f in files)
        keys = [cfg.split_key] if cfg.split_key and split == "train" else []  # validation is carved from train
        batches = parquet_batches(path, files, cfg.image_column, cfg.label_column, keys,
                                  cfg.image_shape or meta.get("image_shape"), cfg.ingest_batch_rows, cfg.limit, fmt)
        splits[split] = SplitStream(batches, min(total, cfg.limit) if cfg.limit else total)
    return Source(splits, label_names, f"parquet:{directory}", split_key=cfg.split_key)


def parquet_batches(path: str, files: list[str], image_column: str, label_column: str | None, columns: list[str],
                    shape: list[int] | None, rows: int, limit: int | None = None,
                    fmt: ImageFormat | None = None) -> Iterator[Batch]:
    """The images (and labels, when `label_column` is named) of Parquet files, `rows` at a time, with the other
    `columns` passed along; the first `limit` rows only, when set."""
    seen = 0
    for batch in iter_parquet_batches(files, [image_column, *([label_column] if label_column else []), *columns], rows):
        if limit and seen + batch.num_rows > limit:
            batch = batch.slice(0, limit - seen)
        where = f"{path} rows {seen}..{seen + batch.num_rows - 1}"
        labels = decode_labels(batch.column(label_column), where) if label_column else None
        yield Batch(decode_images(batch.column(image_column), shape, where, fmt), labels, seen, where,
                    {c: batch.column(c) for c in columns})
        seen += batch.num_rows
        if limit and seen >= limit:
            return


# ------------------------------------------------------------------------------------------------ npz

def _npz_source(path: Path, cfg: DataConfig, fmt: ImageFormat) -> Source:
    arrays = load_npz(path, ("x_train", "y_train", "x_test", "y_test"), NPZ_LAYOUT)
    splits = {}
    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        where = f"{path} x_{split}/y_{split}"
        if len(x) != len(y):
            raise PipelineError(f"{where}: {len(x)} images but {len(y)} labels: x and y must have the same length")
        y = _integer_labels(y, where)
        n = min(len(x), cfg.limit) if cfg.limit else len(x)
        splits[split] = SplitStream(array_batches(x[:n], y[:n], cfg.ingest_batch_rows, where, fmt), n)
    return Source(splits, None, f"npz:{path}")


def _integer_labels(y: np.ndarray, where: str) -> np.ndarray:
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


# ------------------------------------------------------------------------------------------------ TFDS

def _tfds_builder(name: str, cfg: DataConfig):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=cfg.tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise PipelineError(f"unknown TFDS dataset {name!r}: check the name against tfds.list_builders()") from None


def _tfds_source(name: str, cfg: DataConfig, fmt: ImageFormat) -> Source:
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, cfg)
    missing = [s for s in SPLITS if builder.info.splits and s not in builder.info.splits]
    if missing:
        raise PipelineError(f"TFDS dataset {name!r} has no {'/'.join(missing)} split: use a dataset with train and test")
    try:
        datasets, info = tfds.load(name, split=list(SPLITS), data_dir=cfg.tfds_data_dir, download=cfg.tfds_download,
                                   as_supervised=True, with_info=True)
    except Exception as exc:  # TFDS raises AssertionError, DownloadError, OSError... when data is unavailable
        raise PipelineError(f"TFDS dataset {name!r} could not be loaded ({first_line(exc)}): prepare it with network "
                            "access once (data.tfds_download=true) or point data.tfds_data_dir at a prepared copy") from None
    splits = {}
    for split, ds in zip(SPLITS, datasets):
        if cfg.limit:
            ds = ds.take(cfg.limit)
        total = int(ds.cardinality())
        splits[split] = SplitStream(_tfds_batches(ds, cfg.ingest_batch_rows, f"tfds:{name} {split}", fmt),
                                    total if total >= 0 else None)  # negative: unknown
    label = info.features["label"] if "label" in info.features else None
    names = list(label.names) if label is not None and hasattr(label, "names") else None
    return Source(splits, names, f"tfds:{name} {info.version}")


def _tfds_batches(ds, rows: int, where: str, fmt: ImageFormat) -> Iterator[Batch]:
    import tensorflow_datasets as tfds

    seen = 0
    for x, y in tfds.as_numpy(ds.batch(rows)):
        at = f"{where} rows {seen}..{seen + len(x) - 1}"
        yield Batch(to_format(check_numpy_images(x, at), fmt), _integer_labels(np.asarray(y), at), seen, at)
        seen += len(x)


# ------------------------------------------------------------------------------------------------ cache split

def cache_batches(cfg: PipelineConfig, ref: str, rows: int) -> Iterator[Batch]:
    """The images and labels of a published dataset's split (or one shard of it), in stored order."""
    from tasks.reader import make_dataset  # TensorFlow loads here, for cache inputs only

    cache = resolve_cache_ref(cfg.artifacts.root, ref)
    dataset = local_dataset(cache.dataset, cfg.artifacts.local_cache)  # from a bucket: staged, verified shards
    files = [storage.join(dataset.uri, shard) for shard in cache.shards]
    seen = 0
    for images, labels in make_dataset(dataset, cache.split, rows, files=files).as_numpy_iterator():
        yield Batch(images, labels, seen, f"{ref} rows {seen}..{seen + len(images) - 1}")
        seen += len(images)


# ------------------------------------------------------------------------------------------------ prediction

def read_images(cfg: PipelineConfig, input_path: str, fmt: ImageFormat, model_shape: list[int]) -> Iterator[Batch]:
    """Any prediction input, `predict.batch_size` rows at a time, made the model's format `fmt`: a cache split
    (`cache:...`), an `.npz` with the images as `x`, image files (a folder, a bucket prefix or a glob of them,
    keyed by their path), or Parquet (a file, a directory of parts, a URL) with `predict.key_columns` passed
    along, its image shape from its metadata, `data.image_shape`, or the model's input."""
    rows = cfg.predict.batch_size
    if input_path.startswith(CACHE_PREFIX):
        return cache_batches(cfg, input_path, rows)
    if input_path.endswith(".npz"):
        x = load_npz(input_path, ("x",), "an .npz input holds the images as an array x")["x"]
        return array_batches(x, None, rows, f"{input_path} x", fmt)
    images = image_files(input_path)
    if images is not None:
        return file_batches(*images, fmt, cfg.data.model_copy(update={"ingest_batch_rows": rows}))
    files = parquet_files(input_path)
    shape = schema_metadata(open_parquet(files[0]).schema_arrow).get("image_shape") or cfg.data.image_shape
    return parquet_batches(f"{input_path} ({cfg.data.image_column})", files, cfg.data.image_column, None,
                           cfg.predict.key_columns, shape or model_shape, rows, fmt=fmt)


# ------------------------------------------------------------------------------------------------ hashing

def source_hash(cfg: DataConfig) -> tuple[str, str]:
    """(hash, method) identifying the source's content, cheap enough for every run. Parquet: each file's size,
    modification time and footer metadata (row groups, schema, statistics), or with `data.verify_source: full`
    every byte; npz: every byte (the format is small by nature); TFDS: the prepared files' names and sizes."""
    kind, where = scheme(cfg.source)
    if kind == "folder":
        return folder_hash(where, cfg)
    if kind in ("mnist", "parquet"):
        files = [f for p in split_paths(where).values() for f in parquet_files(p)]
        if cfg.verify_source == "full" or kind == "mnist":  # the embedded copy is small: hashed whole, the same
            # fingerprint in every checkout (file times differ from one clone to the next)
            return _digest(f"{_relative(f, where)}:{storage.sha256(f)}" for f in files), "sha256 of every file"
        return _digest(_parquet_identity(f, where) for f in files), "file size, modification time (ETag in a bucket) and Parquet footer"
    if kind == "npz":
        path = Path(where)
        if not path.is_file():
            raise PipelineError(f"{path} does not exist: {NPZ_LAYOUT}")
        return _digest([f"{path.name}:{storage.sha256(str(path))}"]), "sha256 of the file"
    return _tfds_hash(where, cfg), "TFDS version and prepared file sizes"


def _digest(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(f"{part}\n".encode())
    return digest.hexdigest()


def _relative(path: str, base: str) -> str:
    return path.split("://", 1)[-1][len(base.split("://", 1)[-1].rstrip("/")) + 1:]


def _parquet_identity(path: str, base: str) -> str:
    """The file's cheap identity (size, and mtime or the store's checksum) and its Parquet footer."""
    footer = hashlib.sha256(str(open_parquet(path).metadata.to_dict()).encode()).hexdigest()
    return f"{_relative(path, base)}:{storage.file_identity(path)}:{footer}"


def _tfds_hash(name: str, cfg: DataConfig) -> str:
    builder = _tfds_builder(name, cfg)
    parts = [f"tfds:{name}:{builder.info.version}"]
    data_dir = Path(str(builder.data_dir))
    if data_dir.is_dir():
        parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(data_dir.iterdir())]
    return _digest(parts)


def expected_shape(cfg: DataConfig) -> list[int] | None:
    """The shape data.image_size (with an explicit color_mode, its channels) or data.image_shape promises, as
    [height, width] or [height, width, channels]."""
    if cfg.image_size:
        channels = configured_channels(cfg)
        return [*cfg.image_size, *([channels] if channels else [])]
    return normalise_shape(cfg.image_shape) if cfg.image_shape else None


MNIST_SHAPE = [28, 28, 1]


def known_image_shape(cfg: DataConfig) -> list[int] | None:
    """The image shape before any row is read: from data.image_size or data.image_shape (three channels when the
    colour mode is still to be found: the layer stack builds the same), or the embedded MNIST's; else None."""
    shape = expected_shape(cfg)
    if shape is not None:
        return shape if len(shape) == 3 else [*shape, 3]
    return MNIST_SHAPE if cfg.source == "mnist" else None

