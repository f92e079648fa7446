"""A TensorFlow Datasets source (`data.source=tfds:NAME`), streamed through its `tf.data` pipeline: prepared once
with network access (`data.tfds_download`) or read from a prepared copy (`data.tfds_data_dir`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline_config import DataConfig
from tasks.data.arrays import check_numpy_images, integer_labels
from tasks.data.streams import SPLITS, Batch, Source, SplitStream
from tasks.errors import PipelineError, first_line
from tasks.preprocess.decode import to_format
from tasks.preprocess.image_format import ImageFormat


def _tfds_builder(name: str, cfg: DataConfig):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=cfg.tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise PipelineError(f"unknown TFDS dataset {name!r}: check the name against tfds.list_builders()") from None


def tfds_source(name: str, cfg: DataConfig, fmt: ImageFormat) -> Source:
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, cfg)
    missing = [s for s in SPLITS if builder.info.splits and s not in builder.info.splits]
    if missing:
        raise PipelineError(f"TFDS dataset {name!r} has no {'/'.join(missing)} split: use a dataset with train and test")
    try:
        datasets, info = tfds.load(name, split=list(SPLITS), data_dir=cfg.tfds_data_dir, download=cfg.tfds_download,
                                   as_supervised=True, with_info=True)
    except Exception as exc:  # TFDS raises AssertionError, DownloadError, OSError... when data is unavailable
        raise PipelineError(f"TFDS dataset {name!r} could not be loaded ({first_line(exc)}): prepare it with network "
                            "access once (data.tfds_download=true) or point data.tfds_data_dir at a prepared copy") from None
    splits = {}
    for split, ds in zip(SPLITS, datasets):
        if cfg.limit:
            ds = ds.take(cfg.limit)
        total = int(ds.cardinality())
        splits[split] = SplitStream(_tfds_batches(ds, cfg.ingest_batch_rows, f"tfds:{name} {split}", fmt),
                                    total if total >= 0 else None)  # negative: unknown
    label = info.features["label"] if "label" in info.features else None
    names = list(label.names) if label is not None and hasattr(label, "names") else None
    return Source(splits, names, f"tfds:{name} {info.version}")


def _tfds_batches(ds, rows: int, where: str, fmt: ImageFormat) -> Iterator[Batch]:
    import tensorflow_datasets as tfds

    seen = 0
    for x, y in tfds.as_numpy(ds.batch(rows)):
        at = f"{where} rows {seen}..{seen + len(x) - 1}"
        yield Batch(to_format(check_numpy_images(x, at), fmt), integer_labels(np.asarray(y), at), seen, at)
        seen += len(x)


def tfds_identity(name: str, cfg: DataConfig) -> list[str]:
    """What identifies a prepared TFDS dataset: its version and its files' names and sizes."""
    builder = _tfds_builder(name, cfg)
    parts = [f"tfds:{name}:{builder.info.version}"]
    data_dir = Path(str(builder.data_dir))
    if data_dir.is_dir():
        parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(data_dir.iterdir())]
    return parts
