"""Image files read and decoded in worker processes, a batch at a time while the batch before is written: the folder
source's files at ingest and the image files given to prediction alike. Whether a file is an image is decided by
its content (tasks/preprocess/decode.py `open_image`), never by its name: a file of no image format is skipped and
counted; a broken image fails naming it or, with `data.on_bad_image: skip`, is listed and left out (more than
`data.max_bad_fraction` of them fails). Hidden files and directories (a name starting with '.') are not read."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline_config import DataConfig
from tasks.data.streams import Batch
from tasks.errors import PipelineError, first_line
from tasks.preprocess.decode import decode_many
from tasks.preprocess.image_format import ImageFormat, NotAnImage
from tasks.store import storage

log = logging.getLogger("tfpipe.data")
Entry = tuple[str, int]  # (path relative to the folder, label)
BATCH_BYTES = 64 << 20  # a batch's decoded pixels at most: ingest memory stays flat whatever the image size
ENCODED_BYTES = 256 << 20  # files' bytes held at once for decoding (24 MP JPEGs are 5-12 MB each)
READERS = 8  # files read at once


def is_hidden(rel: str) -> bool:
    """A file whose name, or one of whose directories' names, starts with '.' (.DS_Store, .git/...)."""
    return any(part.startswith(".") for part in rel.split("/"))


def visible_files(root: str) -> dict[str, str]:
    """Every file under `root` but hidden ones, by path relative to it, with its cheap identity (one listing)."""
    return {rel: identity for rel, identity in storage.identities_under(root).items() if not is_hidden(rel)}


def _read(root: str, rel: str) -> bytes | PipelineError:
    try:
        with storage.open_file(storage.join(root, rel)) as f:
            return f.read()
    except OSError as exc:  # gone since the listing, no permission, a bucket's refusal
        return PipelineError(f"{root}/{rel} cannot be read ({first_line(exc)}): check the file")


def _decoded(root: str, rels: list[str], fmt: ImageFormat) -> list:
    """For each file: (pixels, its own (height, width)), or the PipelineError that says why not. Files are read by
    threads (a bucket's round trips overlap) and decoded together on every core, ENCODED_BYTES at a time."""
    results: list = []
    group: list[tuple[str, bytes]] = []

    def decode_group() -> None:
        names = [f"{root}/{rel}" for rel, _ in group]
        results.extend(decode_many([blob for _, blob in group], names, fmt))
        group.clear()

    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="tfpipe-read") as readers:
        for start in range(0, len(rels), READERS):
            window = rels[start: start + READERS]
            for rel, blob in zip(window, readers.map(lambda rel: _read(root, rel), window)):
                if isinstance(blob, PipelineError):
                    if group:
                        decode_group()
                    results.append(blob)
                    continue
                group.append((rel, blob))
                if sum(len(b) for _, b in group) >= ENCODED_BYTES:
                    decode_group()
    if group:
        decode_group()
    return results


def batch_rows(cfg: DataConfig, fmt: ImageFormat) -> int:
    """data.ingest_batch_rows, fewer when that many images would hold more than BATCH_BYTES of pixels."""
    if fmt.size is None:
        return cfg.ingest_batch_rows
    per_image = fmt.size[0] * fmt.size[1] * (fmt.channels or 3)
    return max(1, min(cfg.ingest_batch_rows, BATCH_BYTES // per_image))


def image_batches(root: str, entries: list[Entry], fmt: ImageFormat, cfg: DataConfig, report: dict,
                  keys: dict[str, str] | None = None) -> Iterator[Batch]:
    """The entries' images, `batch_rows` at a time, with their paths as the `path` column (and their `keys` as the
    `group` column, when given); the next batch decodes while this one is written. Files of no image format are
    skipped and counted in `report`."""
    kept, bad, shape = 0, 0, None
    rows = batch_rows(cfg, fmt)
    chunks = [[rel for rel, _ in entries[start: start + rows]] for start in range(0, len(entries), rows)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfpipe-decode") as ahead:
        pending = ahead.submit(_decoded, root, chunks[0], fmt) if chunks else None
        for number, chunk in enumerate(chunks):
            results = pending.result()
            pending = ahead.submit(_decoded, root, chunks[number + 1], fmt) if number + 1 < len(chunks) else None
            batch = _batch(root, entries[number * rows: number * rows + len(chunk)], results, cfg, report, shape,
                           kept, keys)
            bad += sum(1 for result in results if isinstance(result, PipelineError)
                       and not isinstance(result, NotAnImage))
            if bad > cfg.max_bad_fraction * len(entries):
                raise PipelineError(f"{root}: {bad} of {len(entries)} images cannot be decoded, more than "
                                    f"data.max_bad_fraction={cfg.max_bad_fraction:g} (see the first: "
                                    f"{report['skipped'][0]['why']})")
            if batch is not None:
                shape = batch.images.shape[1:]
                kept += len(batch.images)
                yield batch


def _batch(root: str, chunk: list[Entry], results: list, cfg: DataConfig, report: dict, shape: tuple | None,
           kept: int, keys: dict[str, str] | None) -> Batch | None:
    """A chunk's decoded images as a Batch; its files of no image format counted, its bad images failing the stage
    or (data.on_bad_image=skip) listed in `report`."""
    images, labels, paths = [], [], []
    for (rel, label), result in zip(chunk, results):
        if isinstance(result, NotAnImage):
            report["not_images"].append(rel)
            continue
        if isinstance(result, PipelineError):
            if cfg.on_bad_image == "fail":
                raise PipelineError(f"{result} (data.on_bad_image=skip leaves bad images out)")
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
    if not images:
        return None
    where = f"{root} files {paths[0]}..{paths[-1]}"
    columns = {"path": pa.array(paths), **({"group": pa.array([keys[p] for p in paths])} if keys else {})}
    return Batch(np.stack(images), np.asarray(labels, np.int64), kept, where, columns)


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
