"""Data augmentation for the training input pipeline: random translation, rotation, zoom, contrast and horizontal
flip, as keras.layers.RandomTranslation / RandomRotation / RandomZoom / RandomContrast / RandomFlip define them.

Applied to whole batches inside tf.data (on the CPU, beside the parse), never to validation, test or prediction
data, and not part of the saved model. Every batch draws its randomness from a stateless seed made of the
epoch's seed and the batch's index, so the same config gives the same batches, and a run resumed in the middle
of an epoch augments the remaining batches exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math

import tensorflow as tf

from pipeline_config import AugmentConfig


def uniform(seed: tf.Tensor, size: tf.Tensor, bound: float) -> tf.Tensor:
    """`size` values in [-bound, bound]."""
    return tf.random.stateless_uniform([size], seed=seed, minval=-bound, maxval=bound)


def affine_transforms(cfg: AugmentConfig, seeds: tf.Tensor, size: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """One output->input pixel mapping per image ([size, 8], the ImageProjectiveTransform form): rotate by
    rotation * 2 pi, scale by 1 + zoom (above 1 zooms out, as in Keras) about the centre, then shift by
    translation * the image size."""
    angle = uniform(seeds[0], size, cfg.rotation * 2 * math.pi)
    scale = 1.0 + uniform(seeds[1], size, cfg.zoom)
    shift_y = uniform(seeds[2], size, cfg.translation) * height
    shift_x = uniform(seeds[3], size, cfg.translation) * width
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = cx - a0 * cx - a1 * cy - shift_x
    b2 = cy - b0 * cx - b1 * cy - shift_y
    zeros = tf.zeros_like(angle)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def augment_pixels(images: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """A uint8 batch augmented (through [0, 1] floats) and rounded back to uint8, what the model takes."""
    out = augment_batch(tf.cast(images, tf.float32) / 255.0, seed, cfg)
    return tf.cast(tf.round(tf.clip_by_value(out, 0.0, 1.0) * 255.0), tf.uint8)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """A float batch [b, h, w, c] in [0, 1], augmented with the stateless `seed` (shape [2], int64)."""
    seeds = tf.random.experimental.stateless_split(seed, num=7)
    size = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    if cfg.translation or cfg.rotation or cfg.zoom:
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=affine_transforms(cfg, seeds, size, height, width),
            output_shape=[height, width], fill_value=0.0, interpolation="BILINEAR", fill_mode=cfg.fill_mode.upper())
    if cfg.contrast:
        factor = 1.0 + uniform(seeds[4], size, cfg.contrast)[:, None, None, None]
        mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
        images = tf.clip_by_value((images - mean) * factor + mean, 0.0, 1.0)
    if cfg.flip:
        flip = tf.random.stateless_uniform([size], seed=seeds[5]) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return images
