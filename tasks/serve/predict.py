"""The predict stage: stream batch predictions to Parquet.

Input (tasks/data/inputs.py: Parquet, image files, an `.npz` with `x`, or a split of a TFRecord cache,
`cache:FINGERPRINT[/SPLIT]`, split `test` by default) is read and written in batches of `predict.batch_size`
rows, so memory stays flat as input grows. The output is written to a temporary file beside the target and
renamed into place; on any error it is removed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_config import PipelineConfig, fingerprint
from tasks.data.inputs import PredictionInput, input_hash, prediction_input, read_images
from tasks.data.streams import Batch
from tasks.errors import PipelineError
from tasks.model.precision import resolve_precision, with_dtype_policy
from tasks.model.published import class_probabilities, load_model, model_input
from tasks.preprocess.image_format import ImageFormat, array_format, model_format
from tasks.progress import progress_bar
from tasks.registry.champion import require_blessed
from tasks.registry.models import resolve_model
from tasks.store import storage
from tasks.store.lease import pid_alive
from tasks.store.publish import reuse_or_publish, stage_dir
from tasks.store.refs import CACHE_PREFIX, DatasetArtifact, PredictionArtifact
from tasks.store.staging import local_file
from tasks.store.storage import join
from tasks.validation.drift import InputWatch, check_drift, drift_path, drift_report

log = logging.getLogger("tfpipe.predict")

PREDICT_CODE_VERSION = "1"
STAGE = "predict"


def _output_batch(outputs: np.ndarray, keys: dict[str, pa.Array], first_row: int, label_names: list[str] | None) -> pa.RecordBatch:
    probs = class_probabilities(outputs).astype(np.float32)
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


@dataclass
class Predictor:
    """A published model ready to predict: its compiled forward pass over uint8 images, and what it is."""

    uri: str
    manifest: dict
    forward: Callable[[np.ndarray], np.ndarray]
    image_shape: list[int]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def image_format(self) -> ImageFormat:
        """How encoded input images become the model's: as in its serving graph (serve_bytes)."""
        return model_format(self.manifest.get("image_format"), self.image_shape)

    @property
    def array_format(self) -> ImageFormat:
        """How input pixel arrays become the model's: as its serving_default signature takes them."""
        return array_format(self.manifest.get("image_format"), self.image_shape)


def load_predictor(cfg: PipelineConfig, model_ref: str, allow_unblessed: bool) -> Predictor:
    """The model `model_ref` names, refused when the gate never blessed it (unless allowed), in the configured
    precision, with a forward pass that scales uint8 pixels as training did."""
    import tensorflow as tf

    root = cfg.artifacts.root
    model_uri, manifest = resolve_model(root, model_ref)
    require_blessed(root, manifest["fingerprint"], allow_unblessed)
    model = load_model(local_file(join(model_uri, manifest["model_path"]), cfg.artifacts.local_cache))
    if cfg.predict.precision != "model":  # else compute as trained: the same numbers as the evaluation
        precision, reason = resolve_precision(cfg.predict.precision)
        model = with_dtype_policy(model, precision)
        log.info("predicting in %s (%s)", precision, reason)
    shape = list(model.input_shape[1:])
    forward = tf.function(lambda x: model(model_input(model, x), training=False),
                          input_signature=[tf.TensorSpec([None, *shape], tf.uint8)])
    return Predictor(model_uri, manifest, lambda images: forward(images).numpy(), shape)


def predict(cfg: PipelineConfig, model_ref: str, source: str | PredictionInput, output: str,
            allow_unblessed: bool | None = None, overwrite: bool = False) -> PredictionArtifact:
    """Predict every image of `source` (a path, told apart here, or a PredictionInput) with the model `model_ref`
    and write Parquet to `output` (an existing `output` only with `overwrite`, and only when tfpipe wrote it)."""
    started = time.perf_counter()
    check_output_free(output, overwrite)
    if isinstance(source, str):
        source = prediction_input(cfg.artifacts.root, source)
    allow = cfg.predict.allow_unblessed if allow_unblessed is None else allow_unblessed
    predictor = load_predictor(cfg, model_ref, allow)
    rows, digest, report = predict_into(cfg, predictor, source, output)
    seconds = time.perf_counter() - started
    log.info("predicted %d rows with model %s into %s in %.1fs", rows, predictor.fingerprint[:12], output, seconds)
    return PredictionArtifact(output=output, rows=rows, sha256=digest, model_fingerprint=predictor.fingerprint,
                              input=source.given, seconds=seconds, drift=report["drift"] if report["judged"] else None,
                              drift_path=drift_path(output))


WRITTEN_BY = {"written_by": "tfpipe"}  # in every prediction file's Parquet schema metadata


def written_by_tfpipe(path: str) -> bool:
    """Whether the file at `path` is a Parquet file whose schema metadata says tfpipe wrote it."""
    try:
        with storage.open_file(path) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    except (OSError, ValueError, pa.ArrowException):
        return False
    return meta.get(b"written_by") == b"tfpipe"


def check_output_free(output: str, overwrite: bool) -> None:
    """No silent overwrite: an existing output is replaced only with --overwrite, and only a file tfpipe wrote."""
    fs, path = storage.filesystem(output)
    if not fs.exists(path) or fs.isdir(path):
        return  # a directory is refused with its own message when the file is written
    if not overwrite:
        raise PipelineError(f"--output {output} already exists: pass --overwrite to replace it (only a file tfpipe "
                            "wrote is replaced)")
    if not written_by_tfpipe(output):
        raise PipelineError(f"--output {output} exists and was not written by tfpipe (its Parquet schema metadata does "
                            "not say so): it is left as it is; choose another output path")


def predict_into(cfg: PipelineConfig, predictor: Predictor, source: PredictionInput, output: str,
                 extra_metadata: dict | None = None, judge_drift: bool = True) -> tuple[int, str, dict]:
    """Predictions of `source` into the Parquet file `output` (local or in a bucket), whole or not at all:
    (rows, sha256 of the file, the drift report; with `judge_drift` False, what was seen, for a merged report)."""
    remote = not storage.is_local(output)
    fs, path = storage.filesystem(output)
    if fs.isdir(path):
        raise PipelineError(f"--output {output} is a directory: name a .parquet file")
    metadata = {**WRITTEN_BY, "model_fingerprint": predictor.fingerprint, "model_uri": predictor.uri,
                "label_names": json.dumps(predictor.manifest.get("label_names")), "input": source.given,
                **(extra_metadata or {})}
    batches = read_images(cfg, source, predictor.image_format, predictor.image_shape, predictor.array_format)
    watch, report = InputWatch(predictor.manifest["num_classes"]), {}

    def judge() -> None:  # before the predictions are in place: on_drift=fail leaves nothing
        if judge_drift:
            report.update(drift_report(cfg, predictor.manifest, watch.summary()))
            check_drift(cfg, report, source.given)
            storage.write_json(drift_path(output), report)

    with tempfile.TemporaryDirectory(prefix="tfpipe-predict-") as scratch:
        # A bucket has no rename: write locally, then one upload (a whole object or none).
        local_output = Path(scratch) / "predictions.parquet" if remote else Path(output)
        rows = write_predictions(batches, predictor, local_output, metadata, source.given, watch, judge)
        digest = storage.sha256(str(local_output))
        if remote:
            try:
                storage.upload_file(str(local_output), output)
            except BaseException:  # the drift report went first: without its predictions, it goes too
                if judge_drift:
                    storage.remove(drift_path(output))
                raise
    return rows, digest, report if judge_drift else watch.summary()


def write_predictions(batches: Iterator[Batch], predictor: Predictor, output_path: Path, metadata: dict,
                      input_path: str, watch: InputWatch, before_publishing: Callable[[], None]) -> int:
    """Stream the predictions into a temporary file beside `output_path` (and what they saw into `watch`), call
    `before_publishing`, then rename the file into place; on any error nothing is left behind. Returns the
    number of rows."""
    created_parent = not output_path.parent.exists()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temp_files(output_path)
    tmp = output_path.parent / f".{output_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writer, rows = None, 0
    try:
        with progress_bar("predict", None, "rows") as update:
            for batch in batches:
                images = batch.images
                if list(images.shape[1:]) != predictor.image_shape:
                    raise PipelineError(f"{input_path}: images are {list(images.shape[1:])} but the model expects "
                                        f"{predictor.image_shape}: predict with a model trained on this kind of image")
                if len(images) == 0:
                    continue
                outputs = predictor.forward(images)
                watch.update(images, class_probabilities(outputs))
                out = _output_batch(outputs, batch.columns, rows, predictor.manifest.get("label_names"))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, out.schema.with_metadata(metadata))
                writer.write_batch(out)
                rows += len(images)
                update(advance=len(images))
        if writer is None:
            raise PipelineError(f"{input_path} has no rows to predict: pass a non-empty input")
        writer.close()
        writer = None
        before_publishing()
        os.replace(tmp, output_path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        if created_parent:
            storage.prune_empty(str(output_path.parent))
        raise
    return rows


def remove_dead_temp_files(output_path: Path) -> None:
    """Temporary files beside `output_path` that predict runs left when they were killed (their process is gone;
    a live run's file stays)."""
    for leftover in output_path.parent.glob(f".{output_path.name}.tmp-*"):
        pid = leftover.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            log.info("removing %s, left by a predict run that did not finish", leftover)
            leftover.unlink(missing_ok=True)


def batch_predict(cfg: PipelineConfig, model_fingerprint: str, dataset: DatasetArtifact) -> PredictionArtifact:
    """The pipeline's batch predictions, kept in the store: the blessed model on `predict.input` (default: the
    dataset's test split), keyed on the model, the input's content and the predict config."""
    source = prediction_input(cfg.artifacts.root, cfg.predict.input or f"{CACHE_PREFIX}{dataset.fingerprint}/test")
    input_fp = dataset.fingerprint if cfg.predict.input is None else input_hash(source)
    fp = fingerprint({"model": model_fingerprint, "input": input_fp, "predict": cfg.predict.model_dump(mode="json"),
                      "image_column": cfg.data.image_column, "code": PREDICT_CODE_VERSION})
    root = cfg.artifacts.root
    final = join(stage_dir(root, STAGE, fp), "predictions.parquet")

    def write(out: str) -> dict:
        artifact = predict(cfg, model_fingerprint, source, join(out, "predictions.parquet"), allow_unblessed=False)
        return {**artifact.model_dump(), "output": final, "drift_path": drift_path(final)}

    published = reuse_or_publish(root, STAGE, fp, write, rebuild=cfg.rebuilds(STAGE))
    if published.cache_hit:
        log.info("predict cache hit: %s", final)
    fields = {k: published.manifest[k] for k in PredictionArtifact.model_fields if k in published.manifest}
    return PredictionArtifact(**{**fields, "uri": published.uri, "cache_hit": published.cache_hit})
