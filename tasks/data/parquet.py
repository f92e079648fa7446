"""Parquet: the one home of reading Parquet files (a file, the part files of a directory or a bucket prefix),
their metadata, and the Parquet source (`data.source=parquet:DIR`, and the embedded MNIST) as streams of row
batches, row group by row group (`ParquetFile.iter_batches`). Image and label columns become arrays in
columns.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_config import DataConfig
from tasks.data.columns import decode_images, decode_labels
from tasks.data.streams import SPLITS, Batch, Source, SplitStream
from tasks.errors import PipelineError, first_line
from tasks.preprocess.image_format import ImageFormat
from tasks.store import storage


def parquet_files(path: str | Path) -> list[str]:
    """A Parquet file, or the sorted part files of a directory (local, or a prefix in a bucket)."""
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


def parquet_source(directory: str, cfg: DataConfig, fmt: ImageFormat) -> Source:
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
                    fmt: ImageFormat | None = None, arrays: ImageFormat | None = None) -> Iterator[Batch]:
    """The images (and labels, when `label_column` is named) of Parquet files, `rows` at a time, with the other
    `columns` passed along; the first `limit` rows only, when set. Encoded images in `fmt`, raw pixels in
    `arrays` (default: `fmt`)."""
    seen = 0
    for batch in iter_parquet_batches(files, [image_column, *([label_column] if label_column else []), *columns], rows):
        if limit and seen + batch.num_rows > limit:
            batch = batch.slice(0, limit - seen)
        where = f"{path} rows {seen}..{seen + batch.num_rows - 1}"
        labels = decode_labels(batch.column(label_column), where) if label_column else None
        yield Batch(decode_images(batch.column(image_column), shape, where, fmt, arrays), labels, seen, where,
                    {c: batch.column(c) for c in columns})
        seen += batch.num_rows
        if limit and seen >= limit:
            return


def parquet_identity(path: str, base: str) -> str:
    """The file's cheap identity (size, and mtime or the store's checksum) and its Parquet footer."""
    footer = hashlib.sha256(str(open_parquet(path).metadata.to_dict()).encode()).hexdigest()
    return f"{storage.relative_to(path, base)}:{storage.file_identity(path)}:{footer}"
