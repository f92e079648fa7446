"""The folder source (`data.source=folder:PATH`): image files in class directories, local or under a bucket prefix,
decoded and resized once, at ingest (read and decoded by image_files.py).

Layouts: `PATH/train/<class>/...` with `PATH/test/<class>/...`; or one `PATH/<class>/...` tree, whose test split is
the files whose path hashes (seeded by `data.seed`) below `data.test_fraction`. Classes are the directory names,
sorted, or `data.class_names` in that order (files of other classes are skipped and counted); or the rows of
`data.labels_file` (`path,label[,split]`, paths relative to PATH). Hidden files and directories are ignored;
files that are no image at all are skipped and counted; an image that cannot be decoded fails the stage naming
it, or with `data.on_bad_image: skip` is listed in the manifest (more than `data.max_bad_fraction` of them fails).

Files go in sorted path order, `data.ingest_batch_rows` at a time (fewer when that many would hold more than
64 MiB of pixels): memory is bounded by the batch, not the folder.
"""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa

from pipeline_config import DataConfig
from tasks.data.image_files import Entry, image_batches, visible_files
from tasks.data.splits import TEST_SALT, below, key_hashes
from tasks.data.streams import Source, SplitStream
from tasks.errors import PipelineError
from tasks.preprocess.decode import image_mode
from tasks.preprocess.image_format import GRAY_MODES, configured_channels, image_format
from tasks.store import storage

LAYOUT = ("data.source=folder:PATH needs PATH/<class>/<image files> (or PATH/train/<class>/... and "
          "PATH/test/<class>/...), or data.labels_file with path,label rows")


def folder_files(root: str) -> dict[str, str]:
    """The folder's visible files by relative path, with their cheap identities (one listing)."""
    if not storage.is_dir(root):
        raise PipelineError(f"{root} is not a directory: {LAYOUT}")
    return visible_files(root)


def folder_source(root: str, cfg: DataConfig) -> Source:
    files = folder_files(root)
    if cfg.labels_file:
        names, found, report = labelled_by_file(cfg, set(files))
    else:
        names, found, report = labelled_by_directory(files, cfg)
    if not found["train"]:
        raise PipelineError(f"{root}: no labelled image files for the train split: {LAYOUT}")
    channels = configured_channels(cfg) or colour_channels(root, found["train"] + found["test"])
    fmt = image_format(cfg, channels)
    report.update(image_format=fmt.settings(), class_names=names, skipped=[], not_images=[], source_sizes={},
                  files_root=os.path.abspath(root) if storage.is_local(root) else root)
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
    """color_mode auto: 3 (rgb) when any image has colour, by its header alone (Pillow reads as much of a file as
    its format's header needs: an ICC profile or XMP of any size before the frame), else 1 (grayscale)."""
    for rel, _ in entries:
        with storage.open_file(storage.join(root, rel)) as f:
            if image_mode(f) not in GRAY_MODES | {None}:  # None: not an image, or a bad one: ingest decides
                return 3
    return 1


def folder_hash(root: str, cfg: DataConfig) -> tuple[str, str]:
    """(hash, method): every visible file's path with its size and mtime or ETag (one listing), or with
    data.verify_source: full its bytes; and the labels file's content."""
    files = folder_files(root)
    digest = hashlib.sha256()
    full = cfg.verify_source == "full"
    for rel in sorted(files):
        identity = storage.sha256(storage.join(root, rel)) if full else files[rel]
        digest.update(f"{rel}:{identity}\n".encode())
    if cfg.labels_file:
        digest.update(f"labels:{storage.sha256(cfg.labels_file)}\n".encode())
    method = "sha256 of every file" if full else "paths, sizes and modification times (ETags in a bucket)"
    return digest.hexdigest(), method
