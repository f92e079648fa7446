"""Reading a DatasetArtifact's TFRecord cache: the training input pipeline, and a split in stored order.

The seed's `from_tensor_slices -> shuffle -> batch`, but from the cache: interleaved shard reads, shuffle,
batch, then one vectorised `tf.io.parse_example` + `decode_raw` per batch (about 25x faster than parsing
record by record), prefetch. Images stay uint8 [0, 255]: the model scales its own input (tasks/model/build.py).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow as tf

from pipeline_config import AugmentConfig
from tasks.data.augment import augment_pixels
from tasks.store.refs import DatasetArtifact
from tasks.store.storage import join

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def shard_paths(dataset: DatasetArtifact, split: str) -> list[str]:
    return [join(dataset.uri, name) for name in dataset.shards[split]]


def decode_batch(serialized: tf.Tensor, image_shape: list[int], encoding: str = "raw") -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of serialized Examples -> (uint8 images [b, h, w, c], int64 labels [b]): raw pixels in one
    vectorised decode_raw, PNG or JPEG bytes decoded record by record."""
    parsed = tf.io.parse_example(serialized, FEATURES)
    if encoding == "raw":
        images = tf.io.decode_raw(parsed["image"], tf.uint8)
    else:
        channels = image_shape[-1]
        images = tf.map_fn(lambda data: tf.io.decode_image(data, channels=channels, expand_animations=False),
                           parsed["image"], fn_output_signature=tf.TensorSpec([None, None, channels], tf.uint8))
    return tf.reshape(images, [-1, *image_shape]), parsed["label"]


def encode_labels(labels: tf.Tensor, label_mode: str, num_classes: int) -> tf.Tensor:
    """Labels in the form the loss expects: class indices, one-hot rows, or a 0/1 float column."""
    if label_mode == "categorical":
        return tf.one_hot(labels, num_classes)
    if label_mode == "binary":
        return tf.cast(tf.reshape(labels, [-1, 1]), tf.float32)
    return labels


def batch_count(records: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches `records` make: the last one short, or left out with `drop_remainder`."""
    return records // batch_size if drop_remainder else -(-records // batch_size)


def make_dataset(dataset: DatasetArtifact, split: str, batch_size: int, *, shuffle_buffer: int | None = None,
                 seed: int | None = None, label_mode: str = "sparse", files: list[str] | None = None,
                 record_shard: tuple[int, int] | None = None,
                 records: int | None = None, drop_remainder: bool = False, augment: AugmentConfig | None = None,
                 augment_stream: int = 0, class_weights: list[float] | None = None) -> tf.data.Dataset:
    """Batched (images, labels) from one split. `shuffle_buffer=None` keeps the stored order; `records` reads
    only the first that many (of the shuffled order, when shuffled); `drop_remainder` leaves out the last
    incomplete batch. Training input adds `augment` (batch i augmented with the stateless seed
    (seed, i), with `augment_stream` folded in when not 0) and `class_weights` ((images, labels, weights) with
    each example's class weight)."""
    paths = files if files is not None else shard_paths(dataset, split)
    ds = tf.data.Dataset.from_tensor_slices(paths)
    if record_shard is not None:  # (count, index): every count-th record of the stored order, then shuffled
        ds = ds.flat_map(tf.data.TFRecordDataset).shard(*record_shard)
        if shuffle_buffer:
            ds = ds.shuffle(shuffle_buffer, seed=seed)
    elif shuffle_buffer:
        # Interleave the shards so the shuffle buffer mixes records of every file. Not parallel: on local
        # disks parallel reads cost throughput, and the batched parse below is the hot part.
        ds = ds.shuffle(len(paths), seed=seed)
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=max(1, len(paths)), block_length=16)
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    else:  # stored order, shard after shard (evaluation and prediction line up with the source rows)
        ds = ds.flat_map(tf.data.TFRecordDataset)
    if records is not None:
        ds = ds.take(records)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if files is None:  # known length: Keras sizes its epochs without running out of data
        count = dataset.counts[split] if records is None else min(records, dataset.counts[split])
        ds = ds.apply(tf.data.experimental.assert_cardinality(batch_count(count, batch_size, drop_remainder)))
    image_shape, num_classes = dataset.image_shape, dataset.num_classes
    augment = augment if augment is not None and augment.enabled else None
    weights = tf.constant(class_weights, tf.float32) if class_weights is not None else None

    def parse(index, serialized):
        images, labels = decode_batch(serialized, image_shape, dataset.encoding)
        if augment is not None:
            key = tf.stack([tf.constant(seed or 0, tf.int64), index])
            if augment_stream:  # another worker's input pipeline: augmentations of its own
                key = tf.random.experimental.stateless_fold_in(key, augment_stream)
            images = augment_pixels(images, key, augment)
        if weights is None:
            return images, encode_labels(labels, label_mode, num_classes)
        return images, encode_labels(labels, label_mode, num_classes), tf.gather(weights, labels)

    # The batch index numbers the batches before any skip, so a resumed epoch draws the same augmentations.
    return ds.enumerate().map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def stored_batches(dataset: DatasetArtifact, split: str, batch_size: int,
                   files: list[str] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A split (or some of its shard files) as NumPy (images, labels) batches in stored order: what evaluation,
    prediction on a cache split and the export checks read."""
    yield from make_dataset(dataset, split, batch_size, files=files).as_numpy_iterator()


def first_images(dataset: DatasetArtifact, split: str, count: int) -> np.ndarray:
    """The first `count` uint8 images of a split, in stored order."""
    return next(stored_batches(dataset, split, min(count, dataset.counts[split])))[0]


def per_worker_dataset_fn(dataset: DatasetArtifact, split: str, global_batch_size: int, *,
                          shuffle_buffer: int | None = None, seed: int | None = None, label_mode: str = "sparse",
                          drop_remainder: bool = False, augment: AugmentConfig | None = None,
                          class_weights: list[float] | None = None):
    """For `strategy.distribute_datasets_from_function`: each input pipeline (worker) reads its own part of the
    split, whole shard files when they divide evenly over the pipelines, else every n-th record, and batches at
    the per-replica size. Every pipeline reads the same number of records, so that no replica runs out of batches
    before its peers (it would get an empty batch, which oneDNN's convolutions on CPU fail on): the split's
    count // n each, less than n records left out, or with `drop_remainder` (training) only whole global batches,
    less than one global batch left out, different records every epoch as the shuffle differs. Each pipeline
    augments with its own stream (its id), so that the workers' batches do not share their random transforms."""
    paths = shard_paths(dataset, split)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = context.get_per_replica_batch_size(global_batch_size)
        n, i = context.num_input_pipelines, context.input_pipeline_id
        count = dataset.counts[split]
        # A worker with several replicas hands its batches to them in turn: whole global batches only, too.
        if drop_remainder or context.num_replicas_in_sync > n:
            records, drop = count // global_batch_size * global_batch_size // n, True
        else:
            records, drop = count // n, False
        common = dict(shuffle_buffer=shuffle_buffer, seed=seed, label_mode=label_mode, records=records,
                      drop_remainder=drop, augment=augment, augment_stream=i, class_weights=class_weights)
        if len(paths) % n == 0:  # ingest deals records round-robin: every file holds count // files or one more
            return make_dataset(dataset, split, batch, files=paths[i::n], **common)
        return make_dataset(dataset, split, batch, files=paths, record_shard=(n, i), **common)

    return dataset_fn
