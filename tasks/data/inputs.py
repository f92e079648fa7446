"""What a prediction input is, decided once at the edge (`prediction_input`), and reading it (`read_images`).

A path becomes a PredictionInput, the value every later step takes: a split or shard of a published dataset
(`cache:FINGERPRINT[/SPLIT[/SHARD]]`), an `.npz` with the images as `x`, Parquet (a file, a directory of parts, a
glob, a bucket prefix), or image files (a folder, a glob or a bucket prefix of them, or one file). What a file is
is decided by its content: Parquet by its magic bytes or its `.parquet` name, an image by its decoder
(image_files.py), never by an image suffix.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict

from pipeline_config import PipelineConfig
from tasks.data.arrays import array_batches, load_npz
from tasks.data.image_files import file_batches, is_hidden, visible_files
from tasks.data.parquet import open_parquet, parquet_batches, parquet_files, schema_metadata
from tasks.data.streams import Batch
from tasks.errors import PipelineError
from tasks.preprocess.image_format import ImageFormat
from tasks.store import storage
from tasks.store.refs import CACHE_PREFIX, resolve_cache_ref
from tasks.store.staging import local_dataset

PARQUET_MAGIC = b"PAR1"  # the first (and last) four bytes of every Parquet file
WILDCARDS = "*?["


class PredictionInput(BaseModel):
    """A prediction input as the user gave it (`given`), and what it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    given: str
    kind: Literal["cache", "npz", "parquet", "images"]
    files: list[str] = []  # npz, parquet: the files; images: paths relative to `base`
    base: str | None = None  # images: the folder they are under

    def one_file(self, path: str) -> "PredictionInput":
        """One of this input's Parquet files (or a cache shard's reference) as an input of its own: a Dask part."""
        return PredictionInput(given=path, kind=self.kind, files=[] if self.kind == "cache" else [path])


def prediction_input(root: str, path: str) -> PredictionInput:
    """What `path` is (one listing, at most one small read); PipelineError when it is nothing to predict on."""
    if path.startswith(CACHE_PREFIX):
        resolve_cache_ref(root, path)  # names a published dataset, or fails in one line now
        return PredictionInput(given=path, kind="cache")
    if path.endswith(".npz"):
        return PredictionInput(given=path, kind="npz", files=[path])
    if any(c in path for c in WILDCARDS):
        base, matched = storage.glob_under(path)
        found = [rel for rel in matched if not is_hidden(rel)]
        if not found:
            raise PipelineError(f"{path} matches no file: check the pattern")
        parquet = [storage.join(base, rel) for rel in found if rel.endswith(".parquet")]
        return PredictionInput(given=path, kind="parquet", files=parquet) if parquet else _images(path, base, found)
    if storage.is_dir(path):
        found = sorted(visible_files(path))
        if any(rel.endswith(".parquet") for rel in found):  # a directory of part files
            return PredictionInput(given=path, kind="parquet", files=parquet_files(path))
        return _images(path, path, found)
    if not storage.exists(path):
        raise PipelineError(f"{path} does not exist: check the path")
    with storage.open_file(path) as f:
        parquet = f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
    if parquet or path.endswith(".parquet"):
        return PredictionInput(given=path, kind="parquet", files=[path])
    base, _, name = path.rpartition("/")
    return PredictionInput(given=path, kind="images", base=base or ".", files=[name])


def _images(given: str, base: str, found: list[str]) -> PredictionInput:
    """A folder's or a glob's files as image files: which of them are images, decoding tells (image_files.py)."""
    if not found:
        raise PipelineError(f"{given} holds no files: check the path")
    return PredictionInput(given=given, kind="images", base=base, files=found)


def read_images(cfg: PipelineConfig, source: PredictionInput, fmt: ImageFormat, model_shape: list[int],
                arrays: ImageFormat | None = None) -> Iterator[Batch]:
    """The input's images, `predict.batch_size` rows at a time: encoded images made the model's format `fmt` (image
    files keyed by their path), pixel arrays made `arrays` (default `fmt`); Parquet with `predict.key_columns`
    passed along, its image shape from its metadata, `data.image_shape`, or the model's input; a cache split in
    stored order."""
    rows = cfg.predict.batch_size
    if source.kind == "cache":
        return cache_batches(cfg, source.given, rows)
    if source.kind == "npz":
        x = load_npz(source.files[0], ("x",), "an .npz input holds the images as an array x")["x"]
        return array_batches(x, None, rows, f"{source.given} x", arrays or fmt)
    if source.kind == "images":
        return file_batches(source.base, source.files, fmt, cfg.data.model_copy(update={"ingest_batch_rows": rows}))
    shape = schema_metadata(open_parquet(source.files[0]).schema_arrow).get("image_shape") or cfg.data.image_shape
    return parquet_batches(f"{source.given} ({cfg.data.image_column})", source.files, cfg.data.image_column, None,
                           cfg.predict.key_columns, shape or model_shape, rows, fmt=fmt, arrays=arrays)


def cache_batches(cfg: PipelineConfig, ref: str, rows: int) -> Iterator[Batch]:
    """The images and labels of a published dataset's split (or one shard of it), in stored order."""
    from tasks.data.reader import stored_batches  # TensorFlow loads here, for cache inputs only

    cache = resolve_cache_ref(cfg.artifacts.root, ref)
    dataset = local_dataset(cache.dataset, cfg.artifacts.local_cache)  # from a bucket: staged, verified shards
    seen = 0
    for images, labels in stored_batches(dataset, cache.split, rows, [storage.join(dataset.uri, shard)
                                                                      for shard in cache.shards]):
        yield Batch(images, labels, seen, f"{ref} rows {seen}..{seen + len(images) - 1}")
        seen += len(images)


def input_hash(source: PredictionInput) -> str:
    """A content hash of a prediction input, so stored predictions are keyed on what was predicted: a cache
    reference names content already; files by their bytes (image files with their relative paths, the key of
    their predictions)."""
    if source.kind == "cache":
        return source.given
    digest = hashlib.sha256()
    for path in source.files:
        if source.kind == "images":
            digest.update(f"{path}:{storage.sha256(storage.join(source.base, path))}\n".encode())
        else:
            digest.update(storage.sha256(path).encode())
    return digest.hexdigest()
