"""Deterministic splits: a row belongs to a split when a seeded 64-bit hash of its index (or of a key: a
`data.split_key` column, an image file's path) falls below the split's fraction. No global permutation: the same
on every machine and every run, and a key keeps related rows (a patient's images, a file) on one side."""

from __future__ import annotations

import hashlib

import numpy as np

from tasks.data.streams import Batch
from tasks.errors import PipelineError

_MASK = (1 << 64) - 1
TEST_SALT = 1_000_003  # a folder's test split draws from another hash than the validation split


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over uint64s: a well-spread hash, the same on every machine and every run."""
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seeded(base: np.ndarray, seed: int) -> np.ndarray:
    offset = mix64(np.array([seed & _MASK], np.uint64))[0]
    with np.errstate(over="ignore"):
        return mix64(base.astype(np.uint64) + offset)


def row_hashes(batch: Batch, seed: int, split_key: str | None = None) -> np.ndarray:
    """A seeded 64-bit hash per row: of its index in the split, or of its `split_key` column's value."""
    if split_key is None:
        return seeded(np.arange(batch.first_row, batch.first_row + len(batch.labels), dtype=np.uint64), seed)
    return key_hashes(batch.columns[split_key].to_pylist(), seed, batch.where)


def key_hashes(keys: list, seed: int, where: str) -> np.ndarray:
    return seeded(np.fromiter((_key_hash(k, where) for k in keys), np.uint64, len(keys)), seed)


def _key_hash(key, where: str) -> int:
    if key is None:
        raise PipelineError(f"{where}: a row has no data.split_key value: fill the column or unset data.split_key")
    raw = key if isinstance(key, bytes) else str(key).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def below(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Which hashes fall below `fraction` of the hash range."""
    return (hashes >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction
