"""Image files read and decoded in worker processes, a batch at a time while the batch before is written: the folder
source's files at ingest and the image files given to prediction alike. Whether a file is an image is decided by
its content (tasks/preprocess/decode.py `open_image`), never by its name: a file of no image format is skipped and
counted; a broken image fails naming it or, with `data.on_bad_image: skip`, is listed and left out (more than
`data.max_bad_fraction` of them fails). Hidden files and directories (a name starting with '.') are not read."""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline_config import DataConfig
from tasks.data.streams import Batch
from tasks.errors import PipelineError
from tasks.preprocess.decode import decode_image_sized
from tasks.preprocess.image_format import ImageFormat, NotAnImage
from tasks.store import storage

log = logging.getLogger("tfpipe.data")
Entry = tuple[str, int]  # (path relative to the folder, label)
BATCH_BYTES = 64 << 20  # a batch's decoded pixels at most: ingest memory stays flat whatever the image size
FILES_A_TASK = 16  # files a decoding process takes at a time (one round trip each)
_pool: dict = {}  # the decoding processes, and the environment they were started with


def is_hidden(rel: str) -> bool:
    """A file whose name, or one of whose directories' names, starts with '.' (.DS_Store, .git/...)."""
    return any(part.startswith(".") for part in rel.split("/"))


def visible_files(root: str) -> dict[str, str]:
    """Every file under `root` but hidden ones, by path relative to it, with its cheap identity (one listing)."""
    return {rel: identity for rel, identity in storage.identities_under(root).items() if not is_hidden(rel)}


def _decoders() -> Executor:
    """Processes that read and decode image files, one per core. Processes, not threads: Pillow's decoders release
    the GIL, but opening, orienting and converting an image is Python: two threads decoded 1.08x one thread, two
    processes 1.68x (bench.folders, 2 cores). Spawned, not forked (this process runs TensorFlow's threads); in a
    process that may not have children (a daemon), threads. Started again when the environment changed (a
    bucket's credentials and endpoint come from it)."""
    environment = tuple(sorted(os.environ.items()))
    if _pool.get("environment") != environment:
        if "executor" in _pool:
            _pool["executor"].shutdown(wait=False)
        workers = os.cpu_count() or 1
        _pool["executor"] = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tfpipe-decode")
                             if multiprocessing.current_process().daemon else
                             ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")))
        _pool["environment"] = environment
    return _pool["executor"]


def _read_and_decode(root: str, rels: list[str], fmt: ImageFormat) -> list:
    """For each file: (pixels, source (height, width)), or the PipelineError that says why not."""
    results = []
    for rel in rels:
        try:
            with storage.open_file(storage.join(root, rel)) as f:
                results.append(decode_image_sized(f.read(), f"{root}/{rel}", fmt))
        except PipelineError as exc:
            results.append(exc)
    return results


def _decoding(root: str, chunk: list[Entry], fmt: ImageFormat) -> list[Future]:
    rels = [rel for rel, _ in chunk]
    return [_decoders().submit(_read_and_decode, root, rels[i: i + FILES_A_TASK], fmt)
            for i in range(0, len(rels), FILES_A_TASK)]


def batch_rows(cfg: DataConfig, fmt: ImageFormat) -> int:
    """data.ingest_batch_rows, fewer when that many images would hold more than BATCH_BYTES of pixels."""
    if fmt.size is None:
        return cfg.ingest_batch_rows
    per_image = fmt.size[0] * fmt.size[1] * (fmt.channels or 3)
    return max(1, min(cfg.ingest_batch_rows, BATCH_BYTES // per_image))


def image_batches(root: str, entries: list[Entry], fmt: ImageFormat, cfg: DataConfig,
                  report: dict) -> Iterator[Batch]:
    """The entries' images, `batch_rows` at a time, with their paths as the `path` column; the next batch decodes
    while this one is written. Files of no image format are skipped and counted in `report`."""
    kept, bad, shape = 0, 0, None
    rows = batch_rows(cfg, fmt)
    chunks = [entries[start: start + rows] for start in range(0, len(entries), rows)]
    pending = _decoding(root, chunks[0], fmt) if chunks else []
    for number, chunk in enumerate(chunks):
        results = [result for task in pending for result in task.result()]
        pending = _decoding(root, chunks[number + 1], fmt) if number + 1 < len(chunks) else []
        images, labels, paths = [], [], []
        for (rel, label), result in zip(chunk, results):
            if isinstance(result, NotAnImage):
                report["not_images"].append(rel)
                continue
            if isinstance(result, PipelineError):
                if cfg.on_bad_image == "fail":
                    raise PipelineError(f"{result} (data.on_bad_image=skip leaves bad images out)")
                bad += 1
                report["skipped"].append({"path": rel, "why": str(result)})
                continue
            pixels, source_size = result
            if shape is None:
                shape = pixels.shape
            elif pixels.shape != shape:
                raise PipelineError(f"{root}/{rel} is {list(pixels.shape)}, the images before it {list(shape)}: set "
                                    "data.image_size (and data.color_mode) to make the images one shape")
            histogram = report["source_sizes"]
            bucket = size_bucket(source_size)
            histogram[bucket] = histogram.get(bucket, 0) + 1
            images.append(pixels)
            labels.append(label)
            paths.append(rel)
        if bad > cfg.max_bad_fraction * len(entries):
            raise PipelineError(f"{root}: {bad} of {len(entries)} images cannot be decoded, more than "
                                f"data.max_bad_fraction={cfg.max_bad_fraction:g} (see the first: "
                                f"{report['skipped'][0]['why']})")
        if images:
            where = f"{root} files {paths[0]}..{paths[-1]}"
            yield Batch(np.stack(images), np.asarray(labels, np.int64), kept, where, {"path": pa.array(paths)})
            kept += len(images)


def size_bucket(size: tuple[int, int]) -> str:
    """The longer side's power-of-two range, as the manifest's histogram of source sizes counts it."""
    low = 1 << (max(size).bit_length() - 1)
    return f"{low}-{2 * low - 1}px"


def file_batches(base: str, paths: list[str], fmt: ImageFormat, cfg: DataConfig) -> Iterator[Batch]:
    """Unlabelled image files (for prediction), `cfg.ingest_batch_rows` at a time, keyed by `path`. As at ingest,
    a file of no image format is skipped and counted (a warning names the first); a bad image fails naming it
    (or with data.on_bad_image=skip is left out); no image at all fails."""
    report = {"skipped": [], "not_images": [], "source_sizes": {}}
    strict = cfg.model_copy(update={"max_bad_fraction": 1.0})  # each bad file is named, or skipped, one by one
    kept = 0
    for batch in image_batches(base, [(p, -1) for p in paths], fmt, strict, report):
        kept += len(batch.images)
        yield Batch(batch.images, None, batch.first_row, batch.where, batch.columns)
    others = report["not_images"]
    if others and not kept:
        raise PipelineError(f"{storage.join(base, others[0])} is not an image (no format Pillow knows): check the file"
                            if len(paths) == 1 else f"{base}: none of its {len(paths)} files is an image (no format "
                            "Pillow knows): check the path")
    if others:
        log.warning("%s: %d file(s) are not images and were left out (the first: %s)", base, len(others), others[0])
