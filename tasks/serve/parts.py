"""Batch prediction of many input files, one output part per file: the logic the Dask engine runs as one Prefect
task per file (flows/prediction.py), testable without Prefect or Dask.

Input (tasks/data/inputs.py): a Parquet file, every `.parquet` under a directory or bucket prefix, the files a
glob matches, or the shards of a cache split (`cache:FINGERPRINT[/SPLIT]`). Output: a directory (or prefix) holding
`part-<input-name>.parquet` for each input, written whole or not at all, and `_manifest.json` listing every part
with its input's hash, rows and sha256, written last. A part whose input hash and model match is not scored
again, so a re-run after a crash scores only what is missing.
"""

from __future__ import annotations

import logging
import os
import resource
import socket

import pyarrow.parquet as pq

from pipeline_config import PipelineConfig
from tasks.data.inputs import PredictionInput
from tasks.errors import PipelineError, first_line
from tasks.registry.champion import require_blessed
from tasks.registry.models import resolve_model
from tasks.store import storage
from tasks.store.publish import PARTS_MANIFEST
from tasks.store.refs import resolve_cache_ref
from tasks.store.storage import join

log = logging.getLogger("tfpipe.predict")

_predictors: dict[tuple, object] = {}  # per worker process: the model is loaded once for all its files


def input_files(cfg: PipelineConfig, source: PredictionInput) -> list[PredictionInput]:
    """The files to score, one part each: the Parquet files, or the shards of a cache split."""
    if source.kind == "cache":
        cache = resolve_cache_ref(cfg.artifacts.root, source.given)
        return [source.one_file(cache.of_shard(shard)) for shard in cache.shards]
    if source.kind != "parquet":
        raise PipelineError(f"{source.given} holds {'image files' if source.kind == 'images' else 'an .npz'}: the Dask "
                            "engine scores Parquet files and cache splits, a part each; score it with the local engine "
                            "(predict.engine=local)")
    return [source.one_file(path) for path in source.files]


def part_name(input_file: str) -> str:
    stem = input_file.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".parquet", ".tfrecord"):
        stem = stem.removesuffix(suffix)
    return f"part-{stem}.parquet"


def resolve_blessed(cfg: PipelineConfig, model_ref: str, allow_unblessed: bool) -> str:
    """The model's fingerprint, resolved once for the whole run (the champion may move meanwhile)."""
    _, manifest = resolve_model(cfg.artifacts.root, model_ref)
    require_blessed(cfg.artifacts.root, manifest["fingerprint"], allow_unblessed)
    return manifest["fingerprint"]


def _predictor(cfg: PipelineConfig, model_fingerprint: str):
    from tasks.serve.predict import load_predictor

    key = (cfg.artifacts.root, model_fingerprint, cfg.predict.precision)
    if key not in _predictors:
        _predictors[key] = load_predictor(cfg, model_fingerprint, allow_unblessed=True)  # checked by the caller
    return _predictors[key]


def predict_part(cfg: PipelineConfig, model_fingerprint: str, source: PredictionInput, output_dir: str,
                 threads: int | None = None, overwrite: bool = False) -> dict:
    """Score one input file (an input of `input_files`) into its part, or skip it when the part already holds this
    input with this model (unless `overwrite`: --overwrite redoes every part)."""
    from tasks.distributed.devices import limit_threads
    from tasks.serve.predict import predict_into

    if threads:
        limit_threads(threads)
    input_file = source.given
    part = join(output_dir, part_name(input_file))
    input_hash = storage.file_identity(_source_file(cfg, source))
    done = _existing_part(part)
    if not overwrite and done.get("input_hash") == input_hash and done.get("model_fingerprint") == model_fingerprint:
        return {"input": input_file, "input_hash": input_hash, "part": part_name(input_file), "rows": done["rows"],
                "sha256": storage.sha256(part), "model_fingerprint": model_fingerprint, "skipped": True}
    predictor = _predictor(cfg, model_fingerprint)
    try:
        rows, digest, seen = predict_into(cfg, predictor, source, part, {"input_hash": input_hash}, judge_drift=False)
    except PipelineError as exc:
        raise PipelineError(f"{input_file}: {exc}") from None
    log.info("scored %s: %d rows into %s", input_file, rows, part)
    return {"input": input_file, "input_hash": input_hash, "part": part_name(input_file), "rows": rows,
            "sha256": digest, "model_fingerprint": model_fingerprint, "skipped": False, "seen": seen,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "worker_peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (how much a worker needs, as its files go by)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _source_file(cfg: PipelineConfig, source: PredictionInput) -> str:
    """Where an input file's bytes are: a cache shard lives in the dataset's directory."""
    if source.kind != "cache":
        return source.files[0]
    cache = resolve_cache_ref(cfg.artifacts.root, source.given)
    return join(cache.dataset.uri, cache.shard)


def _existing_part(part: str) -> dict:
    """The input hash, model and rows an existing part was written with ({} when there is none, or unreadable)."""
    try:
        with storage.open_file(part) as f:
            parquet = pq.ParquetFile(f)
            meta = {k.decode(): v.decode() for k, v in (parquet.schema_arrow.metadata or {}).items()}
            return {**meta, "rows": parquet.metadata.num_rows}
    except (FileNotFoundError, OSError, ValueError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("%s is unreadable (%s): scoring it again", part, first_line(exc))
        return {}


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """No silent overwrite: a finished output (`_manifest.json` and every part it lists) is redone only with
    `overwrite`; a directory holding files tfpipe did not write is refused. An unfinished one of ours is resumed:
    that includes a finished one that lost parts since (deleted, a lifecycle rule), whose manifest no longer holds:
    scoring the missing parts replaces nothing."""
    from tasks.serve.predict import written_by_tfpipe
    from tasks.validation.drift import DIRECTORY_REPORT

    present = storage.files_under(output_dir)
    foreign = [n for n in present if n not in (PARTS_MANIFEST, DIRECTORY_REPORT)
               and not (n.startswith("part-") and written_by_tfpipe(join(output_dir, n)))]
    if foreign:
        raise PipelineError(f"--output {output_dir} holds files tfpipe did not write ({', '.join(sorted(foreign)[:3])}): "
                            "they are left as they are; choose an empty or new output directory")
    if PARTS_MANIFEST not in present:
        if DIRECTORY_REPORT in present:  # an earlier run's, which wrote no manifest after it
            storage.remove(join(output_dir, DIRECTORY_REPORT))
        return
    listed = [p["part"] for p in storage.read_json(join(output_dir, PARTS_MANIFEST)).get("parts", [])]
    lost = [name for name in listed if name not in present]
    if not lost and not overwrite:
        raise PipelineError(f"--output {output_dir} already holds a finished prediction: pass --overwrite to redo it")
    if lost and not overwrite:
        log.warning("%s lost %d of the %d parts its manifest lists (%s): scoring the missing ones", output_dir,
                    len(lost), len(listed), ", ".join(sorted(lost)[:3]))
    for name in (PARTS_MANIFEST, DIRECTORY_REPORT):  # not a finished output until the new ones are written
        storage.remove(join(output_dir, name))


def write_manifest(cfg: PipelineConfig, output_dir: str, model_fingerprint: str, parts: list[dict],
                   failures: list[dict]) -> dict | None:
    """drift.json, then `_manifest.json` last, when every part exists (or, with predict.allow_partial, listing the
    failures). The drift report merges what the parts scored now saw (a part kept from an earlier run is not in
    it); with predict.on_drift=fail and drift, no manifest is written."""
    from tasks.validation.drift import check_drift, drift_path, drift_report, merged

    if failures and not cfg.predict.allow_partial:
        return None
    seen = [p.pop("seen") for p in parts if "seen" in p]
    report = None
    if seen:
        _, model_manifest = resolve_model(cfg.artifacts.root, model_fingerprint)
        report = drift_report(cfg, model_manifest, merged(seen))
        check_drift(cfg, report, output_dir)
        storage.write_json(drift_path(output_dir), report)
    manifest = {"model_fingerprint": model_fingerprint, "parts": sorted(parts, key=lambda p: p["part"]),
                "failures": failures, "rows": sum(p["rows"] for p in parts), "complete": not failures,
                "drift": report["drift"] if report and report["judged"] else None}
    storage.write_json(join(output_dir, PARTS_MANIFEST), manifest)
    return manifest


def default_workers() -> int:
    return os.cpu_count() or 1
