"""What every input of images is read as: batches of rows, with where they came from (the types every reader of
tasks/data/ yields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

SPLITS = ("train", "test")  # the splits a source gives; ingest carves validation out of train


@dataclass
class Batch:
    images: np.ndarray  # uint8 [n, h, w, c]
    labels: np.ndarray | None  # int64 [n]; None where the input has no labels (prediction)
    first_row: int  # index of the batch's first row in its split
    where: str  # "PATH rows A..B", for messages
    columns: dict[str, pa.Array] = field(default_factory=dict)  # other columns asked for


@dataclass
class SplitStream:
    batches: Iterator[Batch]
    total: int | None  # rows, when the source knows it up front (the test split's shards follow source order)


@dataclass
class Source:
    splits: dict[str, SplitStream]
    label_names: list[str] | None
    description: str
    split_key: str | None = None  # the column whose value the validation split hashes (None: the row index)
    report: dict = field(default_factory=dict)  # what reading found (skipped files, sizes), for the manifest
