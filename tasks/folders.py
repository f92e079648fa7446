"""The folder source (`data.source=folder:PATH`): image files in class directories, local or under a bucket prefix,
decoded and resized once, at ingest.

Layouts: `PATH/train/<class>/...` with `PATH/test/<class>/...`; or one `PATH/<class>/...` tree, whose test split is
the files whose path hashes (seeded by `data.seed`) below `data.test_fraction`. Classes are the directory names,
sorted, or `data.class_names` in that order (files of other classes are skipped and counted); or the rows of
`data.labels_file` (`path,label[,split]`, paths relative to PATH). Hidden files and directories are ignored;
files that are no image at all are skipped and counted; an image that cannot be decoded fails the stage naming
it, or with `data.on_bad_image: skip` is listed in the manifest (more than `data.max_bad_fraction` of them fails).

Files go in sorted path order, `data.ingest_batch_rows` at a time (fewer when that many would hold more than
64 MiB of pixels), decoded in worker processes while the batch before is written: memory is bounded by the
batch, not the folder.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline_config import DataConfig
from tasks import storage
from tasks.decoding import GRAY_MODES, ImageFormat, NotAnImage, decode_image_sized, open_image
from tasks.errors import PipelineError
from tasks.splits import TEST_SALT, below, key_hashes
from tasks.streams import Batch, Source, SplitStream

LAYOUT = ("data.source=folder:PATH needs PATH/<class>/<image files> (or PATH/train/<class>/... and "
          "PATH/test/<class>/...), or data.labels_file with path,label rows")
Entry = tuple[str, int]  # (path relative to the folder, label)


def configured_channels(cfg: DataConfig) -> int | None:
    """data.color_mode as a channel count; None for auto (found from the images)."""
    return {"rgb": 3, "grayscale": 1}.get(cfg.color_mode)


def image_format(cfg: DataConfig, channels: int | None) -> ImageFormat:
    return ImageFormat(tuple(cfg.image_size) if cfg.image_size else None, cfg.resize, cfg.interpolation, channels)


def visible_files(root: str) -> dict[str, str]:
    """Every file under `root` but hidden ones (a name starting with '.', or under such a directory), by relative
    path, with its cheap identity."""
    if not storage.is_dir(root):
        raise PipelineError(f"{root} is not a directory: {LAYOUT}")
    return {rel: ident for rel, ident in storage.identities_under(root).items()
            if not any(part.startswith(".") for part in rel.split("/"))}


def folder_source(root: str, cfg: DataConfig) -> Source:
    files = visible_files(root)
    if cfg.labels_file:
        names, found, report = labelled_by_file(cfg, set(files))
    else:
        names, found, report = labelled_by_directory(files, cfg)
    if not found["train"]:
        raise PipelineError(f"{root}: no labelled image files for the train split: {LAYOUT}")
    channels = configured_channels(cfg) or colour_channels(root, found["train"] + found["test"])
    fmt = image_format(cfg, channels)
    report.update(image_format=fmt.settings(), class_names=names, skipped=[], not_images=[], source_sizes={})
    splits = {}
    for split, entries in found.items():
        entries = entries[: cfg.limit] if cfg.limit else entries
        splits[split] = SplitStream(image_batches(root, entries, fmt, cfg, report), len(entries))
    return Source(splits, names, f"folder:{root}", split_key="path", report=report)


def labelled_by_directory(files: dict[str, str], cfg: DataConfig) -> tuple[list[str], dict[str, list[Entry]], dict]:
    """Labels from the class directories; the test split from train/ and test/, or from the path's hash."""
    top = {rel.split("/", 1)[0] for rel in files if "/" in rel}
    presplit = {"train", "test"} <= top
    classed: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    outside = 0
    for rel in sorted(files):
        parts = rel.split("/")
        if presplit and parts[0] in classed and len(parts) >= 3:
            classed[parts[0]].append((rel, parts[1]))
        elif not presplit and len(parts) >= 2:
            classed["train"].append((rel, parts[0]))
        else:
            outside += 1  # not in a class directory
    if not presplit:
        test = below(key_hashes([rel for rel, _ in classed["train"]], cfg.seed + TEST_SALT, "folder"), cfg.test_fraction)
        pairs = classed["train"]
        classed = {"train": [p for p, t in zip(pairs, test) if not t], "test": [p for p, t in zip(pairs, test) if t]}
    names = list(cfg.class_names or sorted({cls for pairs in classed.values() for _, cls in pairs}))
    index = {name: i for i, name in enumerate(names)}
    found = {split: [(rel, index[cls]) for rel, cls in pairs if cls in index] for split, pairs in classed.items()}
    other = sum(len(pairs) for pairs in classed.values()) - sum(len(entries) for entries in found.values())
    return names, found, {"test_split": "train/ and test/ directories" if presplit else
                          f"hash of the path below data.test_fraction={cfg.test_fraction}",
                          "files_outside_class_directories": outside, "files_of_other_classes": other}


def labelled_by_file(cfg: DataConfig, present: set[str]) -> tuple[list[str], dict[str, list[Entry]], dict]:
    """Labels (and, when the file has a `split` column, the split) from data.labels_file."""
    rows = read_labels_file(cfg.labels_file)
    missing = sorted(set(rows["path"]) - present)
    if missing:
        raise PipelineError(f"{cfg.labels_file} names {len(missing)} file(s) the folder does not hold (first: "
                            f"{missing[0]}): paths are relative to the folder; fix the file or the folder")
    labels = rows["label"]
    if cfg.class_names:
        names = list(cfg.class_names)
    elif all(isinstance(v, int) and v >= 0 for v in labels):  # class indices: their names are the numbers
        names = [str(i) for i in range(max(labels) + 1)]
    else:
        names = sorted({str(v) for v in labels})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in labels} - set(index))
    if unknown:
        raise PipelineError(f"{cfg.labels_file}: label {unknown[0]!r} is not one of data.class_names: fix the label "
                            "or add the class")
    splits = rows.get("split") or [None] * len(labels)
    order = sorted(range(len(labels)), key=lambda i: rows["path"][i])
    hashed = below(key_hashes([rows["path"][i] for i in order], cfg.seed + TEST_SALT, cfg.labels_file), cfg.test_fraction)
    found: dict[str, list[Entry]] = {"train": [], "test": []}
    for i, in_test in zip(order, hashed):
        split = splits[i] or ("test" if in_test else "train")
        if split not in found:
            raise PipelineError(f"{cfg.labels_file}: split {split!r} for {rows['path'][i]}: use train or test")
        found[split].append((rows["path"][i], index[str(labels[i])]))
    unlabelled = len(present) - len(rows["path"])
    return names, found, {"test_split": "the labels file's split column" if "split" in rows else
                          f"hash of the path below data.test_fraction={cfg.test_fraction}",
                          "files_without_a_label": unlabelled}


def read_labels_file(path: str) -> dict[str, list]:
    """path, label and (optional) split columns of a CSV or Parquet file, local or in a bucket."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        with storage.open_file(path) as f:
            table = pq.read_table(f) if path.endswith(".parquet") else pacsv.read_csv(f)
    except FileNotFoundError:
        raise PipelineError(f"data.labels_file {path} does not exist: check the path") from None
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(f"data.labels_file {path} is not a readable CSV or Parquet file ({exc}): check it") from None
    if not {"path", "label"} <= set(table.column_names):
        raise PipelineError(f"data.labels_file {path} has columns {table.column_names}: it needs path and label "
                            "(and may have split)")
    columns = [c for c in ("path", "label", "split") if c in table.column_names]
    rows = {c: table.column(c).to_pylist() for c in columns}
    rows["path"] = [str(p).lstrip("/") for p in rows["path"]]
    return rows


def colour_channels(root: str, entries: list[Entry]) -> int:
    """color_mode auto: 3 (rgb) when any image has colour, by its header alone (the first 64 KiB of the file),
    else 1 (grayscale)."""
    for rel, _ in entries:
        try:
            with storage.open_file(storage.join(root, rel)) as f:
                if open_image(f.read(1 << 16), rel).mode not in GRAY_MODES:
                    return 3
        except PipelineError:  # not an image, or a bad one: reading the batches decides what to do with it
            continue
    return 1


BATCH_BYTES = 64 << 20  # a batch's decoded pixels at most: ingest memory stays flat whatever the image size
FILES_A_TASK = 16  # files a decoding process takes at a time (one round trip each)


_pool: dict = {}  # the decoding processes, and the environment they were started with


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


def image_batches(root: str, entries: list[Entry], fmt: ImageFormat, cfg: DataConfig, report: dict,
                  not_images_fail: bool = False) -> Iterator[Batch]:
    """The entries' images, `batch_rows` at a time, with their paths as the `path` column; the next batch decodes
    while this one is written. Files that are no image are skipped and counted (or, with `not_images_fail`,
    treated as bad images)."""
    kept, bad, shape = 0, 0, None
    rows = batch_rows(cfg, fmt)
    chunks = [entries[start: start + rows] for start in range(0, len(entries), rows)]
    pending = _decoding(root, chunks[0], fmt) if chunks else []
    for number, chunk in enumerate(chunks):
        results = [result for task in pending for result in task.result()]
        pending = _decoding(root, chunks[number + 1], fmt) if number + 1 < len(chunks) else []
        images, labels, paths = [], [], []
        for (rel, label), result in zip(chunk, results):
            if isinstance(result, NotAnImage) and not not_images_fail:
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(input_path: str) -> tuple[str, list[str]] | None:
    """(base, image paths relative to it) when a prediction input is image files: a folder or bucket prefix that
    holds images and no Parquet, a glob matching images, or one image file; else None (Parquet)."""
    def images(paths: list[str]) -> list[str]:
        return [p for p in paths if p.lower().endswith(IMAGE_SUFFIXES)]

    if any(c in input_path for c in "*?["):
        found = storage.glob(input_path)
        if any(p.endswith(".parquet") for p in found):
            return None
        base = input_path[: min(input_path.index(c) for c in "*?[" if c in input_path)].rsplit("/", 1)[0]
    elif input_path.lower().endswith(IMAGE_SUFFIXES):
        found, base = [input_path], input_path.rsplit("/", 1)[0]
    elif storage.is_dir(input_path):
        found, base = storage.find(input_path), input_path.rstrip("/")
        if any(p.endswith(".parquet") for p in found):
            return None
    else:
        return None
    found = [p for p in images(found) if not any(part.startswith(".") for part in p[len(base) + 1:].split("/"))]
    if not found:
        raise PipelineError(f"{input_path} holds no image files ({', '.join(IMAGE_SUFFIXES)}) and no Parquet: check "
                            "the path")
    return base, [p[len(base) + 1:] for p in found]


def file_batches(base: str, paths: list[str], fmt: ImageFormat, cfg: DataConfig) -> Iterator[Batch]:
    """Unlabelled image files (for prediction), `cfg.ingest_batch_rows` at a time, keyed by `path`; a file that
    is no image, or a bad one, fails naming it (or with data.on_bad_image=skip is left out)."""
    report = {"skipped": [], "not_images": [], "source_sizes": {}}
    strict = cfg.model_copy(update={"max_bad_fraction": 1.0})  # each bad file is named, or skipped, one by one
    for batch in image_batches(base, [(p, -1) for p in paths], fmt, strict, report, not_images_fail=True):
        yield Batch(batch.images, None, batch.first_row, batch.where, batch.columns)


def folder_hash(root: str, cfg: DataConfig) -> tuple[str, str]:
    """(hash, method): every visible file's path with its size and mtime or ETag (one listing), or with
    data.verify_source: full its bytes; and the labels file's content."""
    files = visible_files(root)
    digest = hashlib.sha256()
    full = cfg.verify_source == "full"
    for rel in sorted(files):
        identity = storage.sha256(storage.join(root, rel)) if full else files[rel]
        digest.update(f"{rel}:{identity}\n".encode())
    if cfg.labels_file:
        digest.update(f"labels:{storage.sha256(cfg.labels_file)}\n".encode())
    method = "sha256 of every file" if full else "paths, sizes and modification times (ETags in a bucket)"
    return digest.hexdigest(), method
