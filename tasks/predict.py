"""Stage 5, predict: stream batch predictions to Parquet.

Input is read and written in chunks of `predict.batch_size` rows, so memory stays flat as input grows. The
output is written to a temporary file beside the target and renamed into place; on any error it is removed.
Inputs: a Parquet file or directory (the ingestion schemas, label optional), an `.npz` with `x`, or a split of a
TFRecord cache (`cache:FINGERPRINT[/SPLIT]`, split `test` by default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_config import PipelineConfig
from tasks.artifacts import PredictionArtifact, file_sha256, join, prune_empty, read_manifest
from tasks.devices import resolve_precision
from tasks.errors import PipelineError
from tasks.images import check_numpy_images, decode_images, iter_parquet_batches, open_parquet, parquet_files, schema_metadata

log = logging.getLogger("tfpipe.predict")

Chunk = tuple[np.ndarray, dict[str, pa.Array]]  # uint8 images, key columns to pass through


def resolve_model(root: str, ref: str) -> tuple[str, dict]:
    """(model directory, its manifest) for `champion`, a model directory, or a fingerprint (or unique prefix)."""
    from tasks.evaluate import read_champion

    if ref == "champion":
        champion = (read_champion(root) or {}).get("current")
        if not champion:
            raise PipelineError(f"no champion under {root}: run the pipeline (tfpipe run) so a model is blessed, "
                                "or pass --model with a model directory or fingerprint")
        uri = champion["model_uri"]
    elif Path(ref).exists():
        uri = str(Path(ref).parent if ref.endswith(".keras") else Path(ref))
    else:
        base = Path(root) / "train"
        matches = sorted(p for p in base.glob(f"{ref}*") if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []
        if len(matches) != 1:
            problem = "matches no model" if not matches else f"matches {len(matches)} models"
            raise PipelineError(f"--model {ref!r} {problem} under {base}: pass champion, a model directory or a full fingerprint")
        uri = str(matches[0])
    manifest = read_manifest(uri)
    if manifest is None or manifest.get("stage") != "train":
        raise PipelineError(f"{uri} is not a published model (no complete train manifest.json): pass a directory "
                            "written by the train stage")
    return uri, manifest


def _parquet_chunks(path: str, image_column: str, key_columns: list[str], shape: list[int],
                    batch_size: int) -> Iterator[Chunk]:
    files = parquet_files(path)
    meta = schema_metadata(open_parquet(files[0]).schema_arrow)
    shape = meta.get("image_shape") or shape
    for batch in iter_parquet_batches(files, [image_column, *key_columns], batch_size):
        where = f"{path} ({image_column})"
        yield decode_images(batch.column(image_column), shape, where), {k: batch.column(k) for k in key_columns}


def _npz_chunks(path: str, batch_size: int) -> Iterator[Chunk]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise PipelineError(f"{path} has no array 'x' (arrays: {', '.join(npz.files)}): save the images as x")
            x = npz["x"]
    except ValueError:
        raise PipelineError(f"{path} holds object arrays or is not a valid .npz: save plain numeric arrays") from None
    except OSError as exc:
        raise PipelineError(f"{path} is not a readable .npz file ({exc}): check the file") from None
    x = check_numpy_images(x, f"{path} x")
    for start in range(0, len(x), batch_size):
        yield x[start: start + batch_size], {}


def _cache_chunks(root: str, ref: str, batch_size: int) -> Iterator[Chunk]:
    from tasks.ingest import dataset_artifact
    from tasks.reader import make_dataset

    name, _, split = ref.partition("/")
    split = split or "test"
    candidates = [Path(name)] if Path(name).is_dir() else sorted((Path(root) / "ingest").glob(f"{name}*"))
    candidates = [c for c in candidates if not c.name.startswith(".")]
    manifest = read_manifest(str(candidates[0])) if len(candidates) == 1 else None
    if manifest is None:
        raise PipelineError(f"cache:{ref} names no single published dataset under {root}/ingest: pass a full fingerprint")
    dataset = dataset_artifact(str(candidates[0]), manifest, cache_hit=True)
    if split not in dataset.shards:
        raise PipelineError(f"cache:{ref}: no split {split!r} (splits: {', '.join(dataset.shards)})")
    for images, _ in make_dataset(dataset, split, batch_size, raw_uint8=True).as_numpy_iterator():
        yield images, {}


def read_chunks(cfg: PipelineConfig, input_path: str, model_shape: list[int]) -> Iterator[Chunk]:
    pc = cfg.predict
    if input_path.startswith("cache:"):
        return _cache_chunks(cfg.artifacts.root, input_path.removeprefix("cache:"), pc.batch_size)
    if input_path.endswith(".npz"):
        if not Path(input_path).is_file():
            raise PipelineError(f"{input_path} does not exist: check the path")
        return _npz_chunks(input_path, pc.batch_size)
    return _parquet_chunks(input_path, cfg.data.image_column, pc.key_columns, cfg.data.image_shape or model_shape,
                           pc.batch_size)


def _output_batch(probs: np.ndarray, keys: dict[str, pa.Array], first_row: int, label_names: list[str] | None) -> pa.RecordBatch:
    if probs.shape[1] == 1:  # a single sigmoid unit: P(class 1)
        probs = np.concatenate([1.0 - probs, probs], axis=1)
    probs = probs.astype(np.float32)
    n, classes = probs.shape
    label = probs.argmax(axis=1)
    columns = dict(keys) if keys else {"row_id": pa.array(np.arange(first_row, first_row + n, dtype=np.int64))}
    columns["predicted_label"] = pa.array(label.astype(np.int64))
    if label_names:
        columns["predicted_name"] = pa.array(np.asarray(label_names, dtype=object)[label], pa.string())
    columns["confidence"] = pa.array(probs[np.arange(n), label])
    offsets = pa.array(np.arange(0, (n + 1) * classes, classes, dtype=np.int32))
    columns["probabilities"] = pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1)))
    return pa.RecordBatch.from_pydict(columns)


def with_dtype_policy(model, policy: str):
    """The same model computing in `policy`, output activation kept in float32 (weights copied)."""
    import keras

    def clone(layer):
        config = layer.get_config()
        if layer is not model.layers[-1]:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    clone_ = keras.models.clone_model(model, clone_function=clone)
    clone_.set_weights(model.get_weights())
    return clone_


def predict(cfg: PipelineConfig, model_ref: str, input_path: str, output: str,
            allow_unblessed: bool | None = None) -> PredictionArtifact:
    """Predict every image of `input_path` with the model `model_ref` and write Parquet to `output`."""
    import tensorflow as tf

    from tasks.evaluate import blessed_models
    from tasks.train import load_model

    started = time.perf_counter()
    root = cfg.artifacts.root
    allow = cfg.predict.allow_unblessed if allow_unblessed is None else allow_unblessed
    model_uri, manifest = resolve_model(root, model_ref)
    model_fp = manifest["fingerprint"]
    if not allow and model_fp not in blessed_models(root):
        raise PipelineError(f"model {model_fp[:12]} was not blessed by the evaluation gate: use the champion, or pass "
                            "--allow-unblessed to predict with it anyway")
    model = load_model(join(model_uri, manifest["model_path"]))
    if cfg.predict.precision != "model":  # else compute as trained: the same numbers as the evaluation
        precision, reason = resolve_precision(cfg.predict.precision)
        model = with_dtype_policy(model, precision)
        log.info("predicting in %s (%s)", precision, reason)
    model_shape = list(model.input_shape[1:])
    forward = tf.function(lambda x: model(tf.cast(x, tf.float32) / 255.0, training=False),
                          input_signature=[tf.TensorSpec([None, *model_shape], tf.uint8)])
    label_names = manifest.get("label_names")

    output_path = Path(output)
    if output_path.is_dir():
        raise PipelineError(f"--output {output} is a directory: name a .parquet file")
    created_parent = not output_path.parent.exists()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.parent / f".{output_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    writer = None
    rows = 0
    try:
        for images, keys in read_chunks(cfg, input_path, model_shape):
            if list(images.shape[1:]) != model_shape:
                raise PipelineError(f"{input_path}: images are {list(images.shape[1:])} but the model expects "
                                    f"{model_shape}: predict with a model trained on this kind of image")
            if len(images) == 0:
                continue
            batch = _output_batch(forward(images).numpy(), keys, rows, label_names)
            if writer is None:
                metadata = {"model_fingerprint": model_fp, "model_uri": model_uri,
                            "label_names": json.dumps(label_names), "input": input_path}
                writer = pq.ParquetWriter(tmp, batch.schema.with_metadata(metadata))
            writer.write_batch(batch)
            rows += len(images)
        if writer is None:
            raise PipelineError(f"{input_path} has no rows to predict: pass a non-empty input")
        writer.close()
        writer = None
        os.replace(tmp, output_path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        if created_parent:
            prune_empty(str(output_path.parent))
        raise
    seconds = time.perf_counter() - started
    log.info("predicted %d rows with model %s into %s in %.1fs", rows, model_fp[:12], output_path, seconds)
    return PredictionArtifact(output=str(output_path), rows=rows, sha256=file_sha256(str(output_path)),
                              model_fingerprint=model_fp, input=input_path, seconds=seconds)


def input_hash(input_path: str) -> str:
    """A content hash of a prediction input, so stored predictions are keyed on what was predicted."""
    if input_path.startswith("cache:"):
        return input_path
    files = [Path(input_path)] if input_path.endswith(".npz") else parquet_files(input_path)
    digest = hashlib.sha256()
    for path in files:
        if not path.is_file():
            raise PipelineError(f"{path} does not exist: check the path")
        digest.update(file_sha256(str(path)).encode())
    return digest.hexdigest()
