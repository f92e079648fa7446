"""Stage 1, ingest: read a source, carve a validation split, write a content-addressed TFRecord cache.

The cache lives in `<root>/ingest/<fingerprint>/`, where the fingerprint covers the source's content hash,
the ingest-relevant part of the `data` config and INGEST_CODE_VERSION. A re-run with the same inputs is a
cache hit whose shard checksums are verified before reuse.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline_config import DataConfig, fingerprint
from tasks.artifacts import DatasetArtifact, file_sha256, join, reuse_or_publish
from tasks.errors import CorruptArtifact, PipelineError, first_line
from tasks.images import (check_numpy_images, decode_images, decode_labels, iter_parquet_batches, load_npz,
                          normalise_shape, open_parquet, parquet_files, schema_metadata)

log = logging.getLogger("tfpipe.ingest")

INGEST_CODE_VERSION = "2"  # 2: shuffled by NumPy (independent of TF's global seed); per-file sha256 source hash
STAGE = "ingest"
EMBEDDED_MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist"
# Keys of `data` that change what is written. The reader-only keys (shuffle_buffer) do not.
INGEST_KEYS = ("source", "validation_fraction", "shards", "seed", "image_column", "label_column", "image_shape",
               "limit", "tfds_data_dir")
NPZ_LAYOUT = "data.source=npz:PATH needs an .npz file with x_train, y_train, x_test, y_test (keras.datasets layout)"


@dataclass
class SourceData:
    """A source loaded into memory: split name -> (uint8 images [n,h,w,c], int64 labels [n])."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    label_names: list[str] | None
    description: str


# ---------------------------------------------------------------------------------------------- sources

def _scheme(source: str) -> tuple[str, str]:
    if source == "mnist":
        return "mnist", str(EMBEDDED_MNIST)
    scheme, _, rest = source.partition(":")
    return scheme, rest


def _split_paths(directory: Path) -> dict[str, Path]:
    if not directory.exists():
        raise PipelineError(f"{directory} does not exist: data.source=parquet:PATH needs a directory with "
                            "train.parquet and test.parquet (or train/ and test/ directories)")
    if not directory.is_dir():
        raise PipelineError(f"{directory} is not a directory: data.source=parquet:PATH needs a directory with "
                            "train.parquet and test.parquet (or train/ and test/ directories)")
    paths = {}
    for split in ("train", "test"):
        for candidate in (directory / f"{split}.parquet", directory / split):
            if candidate.exists():
                paths[split] = candidate
                break
        else:
            raise PipelineError(f"{directory} has no {split}.parquet or {split}/ directory: add the {split} split")
    return paths


def _hash_files(files: list[Path], base: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(base)}:{file_sha256(str(path))}\n".encode())
    return digest.hexdigest()


def source_hash(cfg: DataConfig) -> str:
    """A content hash of the source, cheap enough to compute on every run."""
    scheme, where = _scheme(cfg.source)
    if scheme in ("mnist", "parquet"):
        base = Path(where)
        files = [f for p in _split_paths(base).values() for f in parquet_files(p)]
        return _hash_files(files, base)
    if scheme == "npz":
        path = Path(where)
        if not path.is_file():
            raise PipelineError(f"{path} does not exist: {NPZ_LAYOUT}")
        return _hash_files([path], path.parent)
    return _tfds_hash(where, cfg)


def _load_parquet(directory: Path, cfg: DataConfig) -> SourceData:
    columns = [cfg.image_column, cfg.label_column]
    splits, label_names = {}, None
    for split, path in _split_paths(directory).items():
        files = parquet_files(path)
        meta = schema_metadata(open_parquet(files[0]).schema_arrow)
        shape = cfg.image_shape or meta.get("image_shape")
        label_names = label_names or meta.get("label_names")
        images, labels, seen = [], [], 0
        for batch in iter_parquet_batches(files, columns, batch_size=10000):
            where = f"{path} rows {seen}..{seen + batch.num_rows - 1}"
            images.append(decode_images(batch.column(cfg.image_column), shape, where))
            labels.append(decode_labels(batch.column(cfg.label_column), where))
            seen += batch.num_rows
            if cfg.limit and seen >= cfg.limit:
                break
        if not images:
            raise PipelineError(f"{path}: the {split} split is empty: it needs at least one row")
        splits[split] = (_concat(images, path), np.concatenate(labels))
    return SourceData(splits, label_names, f"parquet:{directory}")


def _concat(images: list[np.ndarray], where: Path) -> np.ndarray:
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise PipelineError(f"{where}: images change shape between row groups {sorted(shapes)}: use one shape")
    return np.concatenate(images)


def _load_npz(path: Path) -> SourceData:
    arrays = load_npz(path, ("x_train", "y_train", "x_test", "y_test"), NPZ_LAYOUT)
    splits = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        where = f"{path} x_{split}/y_{split}"
        if len(x) != len(y):
            raise PipelineError(f"{where}: {len(x)} images but {len(y)} labels: x and y must have the same length")
        if y.dtype == object or not np.issubdtype(y.dtype, np.integer):
            if y.dtype != object and np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
                y = y.astype(np.int64)
            else:
                raise PipelineError(f"{where}: labels are {y.dtype}, expected integers: store class indices 0..N-1")
        y = y.reshape(-1).astype(np.int64)
        if y.size and y.min() < 0:
            raise PipelineError(f"{where}: negative label {y.min()}: labels must be class indices 0..N-1")
        splits[split] = (check_numpy_images(x, where), y)
    return SourceData(splits, None, f"npz:{path}")


def _tfds_builder(name: str, cfg: DataConfig):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=cfg.tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise PipelineError(f"unknown TFDS dataset {name!r}: check the name against tfds.list_builders()") from None


def _tfds_hash(name: str, cfg: DataConfig) -> str:
    builder = _tfds_builder(name, cfg)
    digest = hashlib.sha256(f"tfds:{name}:{builder.info.version}".encode())
    data_dir = Path(str(builder.data_dir))
    if data_dir.is_dir():
        for path in sorted(data_dir.iterdir()):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def _load_tfds(name: str, cfg: DataConfig) -> SourceData:
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, cfg)
    missing = [s for s in ("train", "test") if builder.info.splits and s not in builder.info.splits]
    if missing:
        raise PipelineError(f"TFDS dataset {name!r} has no {'/'.join(missing)} split: use a dataset with train and test")
    try:
        (train, test), info = tfds.load(name, split=["train", "test"], data_dir=cfg.tfds_data_dir,
                                        download=cfg.tfds_download, as_supervised=True, with_info=True)
    except Exception as exc:  # TFDS raises AssertionError, DownloadError, OSError... when data is unavailable
        raise PipelineError(f"TFDS dataset {name!r} could not be loaded ({first_line(exc)}): prepare it with network "
                            "access once (data.tfds_download=true) or point data.tfds_data_dir at a prepared copy") from None
    splits = {}
    for split, ds in (("train", train), ("test", test)):
        if cfg.limit:
            ds = ds.take(cfg.limit)
        xs, ys = [], []
        for x, y in tfds.as_numpy(ds.batch(4096)):
            xs.append(x)
            ys.append(y)
        if not xs:
            raise PipelineError(f"tfds:{name}: the {split} split is empty: it needs at least one example")
        splits[split] = (check_numpy_images(np.concatenate(xs), f"tfds:{name} {split}"), np.concatenate(ys).astype(np.int64))
    label = info.features["label"] if "label" in info.features else None
    names = list(label.names) if label is not None and hasattr(label, "names") else None
    return SourceData(splits, names, f"tfds:{name} {info.version}")


def load_source(cfg: DataConfig) -> SourceData:
    scheme, where = _scheme(cfg.source)
    if scheme in ("mnist", "parquet"):
        data = _load_parquet(Path(where), cfg)
        if scheme == "mnist":
            data.description = "mnist (embedded Parquet, data/mnist)"
    elif scheme == "npz":
        data = _load_npz(Path(where))
    else:
        data = _load_tfds(where, cfg)
    if cfg.limit:
        data.splits = {s: (x[: cfg.limit], y[: cfg.limit]) for s, (x, y) in data.splits.items()}
    if cfg.image_shape and scheme != "parquet" and scheme != "mnist":
        for split, (x, _) in data.splits.items():
            if list(x.shape[1:]) != normalise_shape(cfg.image_shape):
                raise PipelineError(f"{cfg.source} {split}: images are {list(x.shape[1:])}, data.image_shape says "
                                    f"{cfg.image_shape}: fix data.image_shape")
    for split, (x, _) in data.splits.items():
        if len(x) == 0:
            raise PipelineError(f"{cfg.source}: the {split} split is empty: it needs at least one example")
    shapes = {s: x.shape[1:] for s, (x, _) in data.splits.items()}
    if len(set(shapes.values())) > 1:
        raise PipelineError(f"{cfg.source}: train and test images differ in shape {shapes}: use one shape")
    return data


# ------------------------------------------------------------------------------------------ the stage

def dataset_fingerprint(src_hash: str, cfg: DataConfig) -> str:
    section = {k: getattr(cfg, k) for k in INGEST_KEYS}
    return fingerprint({"source_hash": src_hash, "data": section, "code": INGEST_CODE_VERSION})


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """(train, validation) carved deterministically by `seed`."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * fraction)))
    if n_val >= len(x):
        raise PipelineError(f"validation_fraction {fraction} leaves no training examples out of {len(x)}: lower it")
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 on the wire: negatives as 10-byte two's complement
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _head(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _field(number: int, payload: bytes) -> bytes:
    return _head(number, len(payload)) + payload


class ExampleEncoder:
    """A tf.train.Example of raw uint8 pixel bytes and an int64 label, several times faster than the protobuf API.

    Every record of a dataset has one layout, Example{features: {"image": bytes_list[pixels], "label":
    int64_list[label]}}, with a fixed number of pixel bytes: only the pixels and the label's varint change, so a
    record is a precomputed head + the pixels + a per-label tail. The tests check it against the protobuf API
    (equal messages; protobuf itself may order the two map entries either way).
    """

    def __init__(self, image_nbytes: int):
        n = image_nbytes
        bytes_list = len(_head(1, n)) + n                       # BytesList{value: pixels}
        feature = len(_head(1, bytes_list)) + bytes_list        # Feature{bytes_list}
        key = _field(1, b"image")
        entry = len(key) + len(_head(2, feature)) + feature     # map entry {key, value}
        self.image_entry_head = _head(1, entry) + key + _head(2, feature) + _head(1, bytes_list) + _head(1, n)
        self.image_entry_size = len(_head(1, entry)) + entry
        self.parts: dict[int, tuple[bytes, bytes]] = {}

    def _parts(self, label: int) -> tuple[bytes, bytes]:
        label_entry = _field(1, _field(1, b"label") + _field(2, _field(3, _field(1, _varint(label)))))
        head = _head(1, self.image_entry_size + len(label_entry)) + self.image_entry_head  # Example{features}
        return head, label_entry

    def encode(self, image_bytes: bytes, label: int) -> bytes:
        parts = self.parts.get(label)
        if parts is None:
            parts = self.parts[label] = self._parts(label)
        return parts[0] + image_bytes + parts[1]


def write_tfrecord_shards(directory: str, split: str, x: np.ndarray, y: np.ndarray, shards: int,
                          shuffle_seed: int | None) -> list[dict]:
    """Write (x, y) as `shards` TFRecord files; shuffled once first when `shuffle_seed` is given (by NumPy, so
    the cache's content depends on the seed alone, not on TensorFlow's global random state)."""
    import tensorflow as tf

    order = np.random.default_rng(shuffle_seed).permutation(len(x)) if shuffle_seed is not None else np.arange(len(x))
    shards = max(1, min(shards, len(x)))
    bounds = np.linspace(0, len(x), shards + 1).astype(int)  # contiguous, near-equal shard sizes
    names = [f"{split}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
    writers = [tf.io.TFRecordWriter(join(directory, n)) for n in names]
    encoder = ExampleEncoder(int(np.prod(x.shape[1:])))
    index = 0
    shard = 0
    for start in range(0, len(x), 4096):
        rows = order[start: start + 4096]
        for image, label in zip(x[rows], y[rows].tolist()):
            while index >= bounds[shard + 1]:
                shard += 1
            writers[shard].write(encoder.encode(image.tobytes(), label))
            index += 1
    for w in writers:
        w.close()
    return [{"file": n, "count": int(bounds[i + 1] - bounds[i]), "sha256": file_sha256(join(directory, n))}
            for i, n in enumerate(names)]


def verify_shards(uri: str, manifest: dict) -> None:
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = join(uri, shard["file"])
            try:
                actual = file_sha256(path)
            except Exception:
                actual = None
            if actual != shard["sha256"]:
                problem = "is missing" if actual is None else "fails its sha256 check"
                raise CorruptArtifact(f"cached shard {path} {problem}")


def dataset_artifact(uri: str, manifest: dict, cache_hit: bool) -> DatasetArtifact:
    return DatasetArtifact(
        uri=uri, fingerprint=manifest["fingerprint"], cache_hit=cache_hit,
        source=manifest["source"], source_hash=manifest["source_hash"],
        counts={s: info["count"] for s, info in manifest["splits"].items()},
        image_shape=manifest["image_shape"], num_classes=manifest["num_classes"],
        label_names=manifest["label_names"],
        shards={s: [sh["file"] for sh in info["shards"]] for s, info in manifest["splits"].items()},
    )


def ingest(cfg: DataConfig, root: str) -> DatasetArtifact:
    """Turn `cfg.source` into a verified TFRecord cache under `root` (or reuse the one already there)."""
    started = time.perf_counter()
    src_hash = source_hash(cfg)
    fp = dataset_fingerprint(src_hash, cfg)
    published = reuse_or_publish(root, STAGE, fp, lambda out: write_cache(cfg, src_hash, out), verify=verify_shards)
    splits = published.manifest["splits"]
    if published.cache_hit:
        log.info("ingest cache hit: %s (%d shards verified)", published.uri, sum(len(s["shards"]) for s in splits.values()))
    else:
        total, seconds = sum(s["count"] for s in splits.values()), time.perf_counter() - started
        log.info("ingested %d images from %s into %s in %.1fs (%.0f images/s)", total, published.manifest["source"],
                 published.uri, seconds, total / max(seconds, 1e-9))
    return dataset_artifact(published.uri, published.manifest, published.cache_hit)


def write_cache(cfg: DataConfig, src_hash: str, out: str) -> dict:
    """Load the source, carve the validation split, write every split's shards into `out`; the manifest body."""
    data = load_source(cfg)
    (x_train, y_train), (x_test, y_test) = data.splits["train"], data.splits["test"]
    (x_tr, y_tr), (x_val, y_val) = split_validation(x_train, y_train, cfg.validation_fraction, cfg.seed)
    splits = {"train": (x_tr, y_tr), "validation": (x_val, y_val), "test": (x_test, y_test)}
    max_label = int(max(y.max() for _, y in splits.values() if len(y)))
    names = data.label_names
    if names is not None and max_label >= len(names):
        raise PipelineError(f"{cfg.source}: label {max_label} but only {len(names)} label names: fix the labels or the "
                            "label_names metadata")
    num_classes = len(names) if names else max_label + 1
    split_info = {}
    for i, (split, (x, y)) in enumerate(splits.items()):
        # The test split keeps the source's row order, so predictions on it line up with the source rows.
        seed = None if split == "test" else cfg.seed + i
        split_info[split] = {"count": int(len(x)), "shards": write_tfrecord_shards(out, split, x, y, cfg.shards, seed),
                             "class_histogram": np.bincount(y, minlength=num_classes).tolist()}
    return {"source": data.description, "source_hash": src_hash, "image_shape": [int(s) for s in x_tr.shape[1:]],
            "dtype": "uint8", "num_classes": num_classes, "label_names": names, "splits": split_info,
            "data_config": {k: getattr(cfg, k) for k in INGEST_KEYS}, "code_version": INGEST_CODE_VERSION}
