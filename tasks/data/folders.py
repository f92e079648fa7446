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

import numpy as np
import pyarrow as pa

from pipeline_config import DataConfig
from tasks.data.image_files import Entry, image_batches, visible_files
from tasks.data.splits import TEST_SALT, below, key_hashes
from tasks.data.streams import Source, SplitStream
from tasks.errors import PipelineError
from tasks.preprocess.decode import image_mode
from tasks.preprocess.image_format import GRAY_MODES, configured_channels, image_format
from tasks.store import storage

LAYOUT = ("data.source=folder:PATH needs PATH/<class>/<image files> (or PATH/train/<class>/... with PATH/val/ "
          "and PATH/test/), or data.labels_file with path,label rows")
# Directories that name a split when class directories are under them, wherever they are in the tree.
SPLIT_DIRECTORIES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation",
                     "test": "test"}


def folder_files(root: str) -> dict[str, str]:
    """The folder's visible files by relative path, with their cheap identities (one listing)."""
    if not storage.is_dir(root):
        raise PipelineError(f"{root} is not a directory: {LAYOUT}")
    return visible_files(root)


def folder_source(root: str, cfg: DataConfig) -> Source:
    files = folder_files(root)
    keys = content_keys(root, files)
    if cfg.labels_file:
        names, found, report = labelled_by_file(cfg, set(files), keys)
    else:
        names, found, report = labelled_by_directory(files, cfg, keys)
    if not found["train"]:
        raise PipelineError(f"{root}: no labelled image files for the train split: {LAYOUT}")
    classes = sorted({label for entries in found.values() for _, label in entries})
    if len(classes) < 2:
        raise PipelineError(f"{root}: the data has {len(classes)} class ({', '.join(names[c] for c in classes) or 'none'})"
                            f": a classifier needs at least two; check the layout ({LAYOUT})")
    channels = configured_channels(cfg) or colour_channels(root, [e for entries in found.values() for e in entries])
    fmt = image_format(cfg, channels)
    report.update(image_format=fmt.settings(), class_names=names, skipped=[], not_images=[], source_sizes={},
                  files_root=os.path.abspath(root) if storage.is_local(root) else root)
    splits = {}
    for split, entries in found.items():
        if split == "validation" and not entries:
            continue  # carved from train at ingest
        entries = balanced(entries, cfg.limit, cfg.seed) if cfg.limit else entries
        splits[split] = SplitStream(image_batches(root, entries, fmt, cfg, report, keys), len(entries))
    return Source(splits, names, f"folder:{root}", split_key="group", report=report)


def content_keys(root: str, files: dict[str, str]) -> dict[str, str]:
    """A key per file that identical files share, so that the splits tfpipe draws keep copies of a photo under two
    names together: the bytes' sha256 for the files whose size another file has too (only those can be copies:
    they are read once more), the path for the others."""
    by_size: dict[str, list[str]] = {}
    for rel, identity in files.items():
        by_size.setdefault(identity.split(":", 1)[0], []).append(rel)
    return {rel: f"sha256:{storage.sha256(storage.join(root, rel))}" if len(rels) > 1 else rel
            for rels in by_size.values() for rel in rels}


def balanced(entries: list[Entry], limit: int, seed: int) -> list[Entry]:
    """At most `limit` entries with every class kept: a seeded sample drawn from each class in turn (a class with
    fewer gives all it has), in path order."""
    by_class: dict[int, list[Entry]] = {}
    for entry in entries:
        by_class.setdefault(entry[1], []).append(entry)
    rng = np.random.default_rng(seed)
    queues = [[members[i] for i in rng.permutation(len(members))] for _, members in sorted(by_class.items())]
    picked: list[Entry] = []
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop())
    return sorted(picked)


def _split_at(parts: list[str]) -> int | None:
    """Where a split directory is in a file's path: one with a class directory and the file under it."""
    return next((i for i in range(len(parts) - 2) if parts[i].lower() in SPLIT_DIRECTORIES), None)


def labelled_by_directory(files: dict[str, str], cfg: DataConfig,
                          keys: dict[str, str]) -> tuple[list[str], dict[str, list[Entry]], dict]:
    """Labels from the class directories; the splits from train/, val/ (validation/, valid/) and test/ directories
    wherever they are, or drawn by a seeded hash of the content key: the test split (when there is no test/)
    here, the validation split (when there is no val/) at ingest."""
    presplit = any(_split_at(rel.split("/")) is not None for rel in files)
    classed: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    outside = 0
    for rel in sorted(files):
        parts = rel.split("/")
        at = _split_at(parts) if presplit else None
        if at is not None:
            classed[SPLIT_DIRECTORIES[parts[at].lower()]].append((rel, parts[at + 1]))
        elif not presplit and len(parts) >= 2:
            classed["train"].append((rel, parts[0]))
        else:
            outside += 1  # not in a class directory
    if presplit and not classed["train"]:
        raise PipelineError(f"the folder has split directories ({', '.join(s for s in classed if classed[s])}) but no "
                            f"train/<class>/ files: {LAYOUT}")
    given = [f"{name}/" for name, split in (("train", "train"), ("val", "validation"), ("test", "test"))
             if presplit and classed[split]]
    drawn = not classed["test"]
    if drawn:
        pairs = classed["train"]
        test = below(key_hashes([keys[rel] for rel, _ in pairs], cfg.seed + TEST_SALT, "folder"), cfg.test_fraction)
        classed.update(train=[p for p, t in zip(pairs, test) if not t], test=[p for p, t in zip(pairs, test) if t])
    names = list(cfg.class_names or sorted({cls for pairs in classed.values() for _, cls in pairs}))
    index = {name: i for i, name in enumerate(names)}
    found = {split: [(rel, index[cls]) for rel, cls in pairs if cls in index] for split, pairs in classed.items()}
    other = sum(len(pairs) for pairs in classed.values()) - sum(len(entries) for entries in found.values())
    return names, found, {"test_split": f"hash of the content below data.test_fraction={cfg.test_fraction}"
                          if drawn else "the test/ directory", "split_directories": given,
                          "files_outside_class_directories": outside, "files_of_other_classes": other}


def labelled_by_file(cfg: DataConfig, present: set[str],
                     keys: dict[str, str]) -> tuple[list[str], dict[str, list[Entry]], dict]:
    """Labels (and, when the file has a `split` column, the split) from data.labels_file."""
    rows = read_labels_file(cfg.labels_file)
    missing = sorted(set(rows["path"]) - present)
    if missing:
        raise PipelineError(f"{cfg.labels_file} names {len(missing)} file(s) the folder does not hold (first: "
                            f"{missing[0]}): paths are relative to the folder; fix the file or the folder")
    labels = rows["label"]
    indices = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels)
    if cfg.class_names:
        names = list(cfg.class_names)
        if indices:  # class indices into data.class_names
            if max(labels) >= len(names):
                raise PipelineError(f"{cfg.labels_file}: label {max(labels)} but data.class_names has {len(names)} "
                                    "names: fix the label or add the class")
            labels = [names[v] for v in labels]
    elif indices:  # class indices: their names are the numbers
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
    hashed = below(key_hashes([keys[rows["path"][i]] for i in order], cfg.seed + TEST_SALT, cfg.labels_file),
                   cfg.test_fraction)
    found: dict[str, list[Entry]] = {"train": [], "validation": [], "test": []}
    for i, in_test in zip(order, hashed):
        split = SPLIT_DIRECTORIES.get(str(splits[i]).lower()) if splits[i] else ("test" if in_test else "train")
        if split is None:
            raise PipelineError(f"{cfg.labels_file}: split {splits[i]!r} for {rows['path'][i]}: use train, val or test")
        found[split].append((rows["path"][i], index[str(labels[i])]))
    unlabelled = len(present) - len(rows["path"])
    return names, found, {"test_split": "the labels file's split column" if "split" in rows else
                          f"hash of the content below data.test_fraction={cfg.test_fraction}",
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
