"""Image statistics computed while streaming (flat memory, but for one 8-byte hash per image): what validation
compares a dataset with its schema and the champion's data by, and prediction its inputs with the training data.

Per split: the count, the class histogram, each channel's mean and standard deviation, histograms of the
images' brightness (mean pixel) and contrast (pixel standard deviation), near-blank images (contrast under
BLANK_CONTRAST), and exact duplicates by a 64-bit hash of the decoded pixels, within the split and across splits.
"""

from __future__ import annotations

import numpy as np

BINS = 32
BRIGHTNESS_RANGE = (0.0, 256.0)  # mean pixel, 0-255
CONTRAST_RANGE = (0.0, 128.0)  # pixel standard deviation (at most 127.5 for uint8)
BLANK_CONTRAST = 2.0  # an image whose pixels vary less than this is blank for any use
CHUNK = 256  # images per float computation


class ImageStatistics:
    """Running statistics of one stream of uint8 images (and labels, where there are)."""

    def __init__(self, hashes: bool = True):
        self.hashing = hashes  # duplicates and leakage need them; prediction's drift does not
        self.count = 0
        self.classes = np.zeros(0, np.int64)
        self.channel_sum = self.channel_squares = None
        self.pixels_per_channel = 0
        self.brightness = np.zeros(BINS, np.int64)
        self.contrast = np.zeros(BINS, np.int64)
        self.blank = 0
        self.hash_chunks: list[np.ndarray] = []  # uint64 per image: 8 bytes each, however many images

    def update(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        for start in range(0, len(images), CHUNK):  # float copies of a few hundred images at a time, whatever the batch
            self._update(images[start:start + CHUNK], None if labels is None else labels[start:start + CHUNK])

    def _update(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        n = len(images)
        if not n:
            return
        channels = images.shape[-1] if images.ndim == 4 else 1
        flat = images.reshape(n, -1, channels).astype(np.float32)  # exact: sums of a few hundred uint8 pixels
        if self.channel_sum is None:
            self.channel_sum, self.channel_squares = np.zeros(channels), np.zeros(channels)
        per_image_channel = flat.sum(axis=1, dtype=np.float64)
        squares = np.einsum("npc,npc->nc", flat, flat, dtype=np.float64)
        self.channel_sum += per_image_channel.sum(axis=0)
        self.channel_squares += squares.sum(axis=0)
        self.pixels_per_channel += n * flat.shape[1]
        size = flat.shape[1] * channels
        means = per_image_channel.sum(axis=1) / size
        stds = np.sqrt(np.maximum(squares.sum(axis=1) / size - np.square(means), 0))
        self.brightness += np.histogram(means, BINS, BRIGHTNESS_RANGE)[0]
        self.contrast += np.histogram(np.minimum(stds, CONTRAST_RANGE[1] - 1e-9), BINS, CONTRAST_RANGE)[0]
        self.blank += int((stds < BLANK_CONTRAST).sum())
        if self.hashing:
            self.hash_chunks.append(pixel_hashes(images.reshape(n, -1)))
        if labels is not None:
            counts = np.bincount(labels, minlength=len(self.classes))
            counts[: len(self.classes)] += self.classes
            self.classes = counts
        self.count += n

    def unique_hashes(self) -> np.ndarray:
        return np.unique(np.concatenate(self.hash_chunks)) if self.hash_chunks else np.zeros(0, np.uint64)

    def summary(self, num_classes: int | None = None) -> dict:
        mean = self.channel_sum / max(self.pixels_per_channel, 1) if self.channel_sum is not None else np.zeros(0)
        var = self.channel_squares / max(self.pixels_per_channel, 1) - np.square(mean) if self.channel_sum is not None \
            else np.zeros(0)
        classes = self.classes
        if num_classes is not None and len(classes) < num_classes:
            classes = np.concatenate([classes, np.zeros(num_classes - len(classes), np.int64)])
        bright = self.brightness / max(self.count, 1)
        centres = np.linspace(*BRIGHTNESS_RANGE, BINS + 1)
        return {"count": self.count, "class_histogram": classes.tolist(),
                "channel_mean": mean.round(4).tolist(), "channel_std": np.sqrt(np.maximum(var, 0)).round(4).tolist(),
                "brightness_histogram": self.brightness.tolist(), "contrast_histogram": self.contrast.tolist(),
                "brightness_mean": float((bright * (centres[:-1] + centres[1:]) / 2).sum()),
                "blank_images": self.blank, "duplicate_images": self.count - len(self.unique_hashes())}


def pixel_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes, vectorised: the bytes as 64-bit words (zero-padded), each word mixed
    with its position by splitmix64's finaliser, the mixed words summed. Equal rows hash equal; different rows
    collide with a probability of about 2**-64 a pair."""
    n, width = rows.shape
    padded = np.zeros((n, -(-width // 8) * 8), np.uint8)
    padded[:, :width] = rows
    words = padded.view(np.uint64) + np.arange(1, padded.shape[1] // 8 + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        words ^= words >> np.uint64(30)
        words *= np.uint64(0xBF58476D1CE4E5B9)
        words ^= words >> np.uint64(27)
        words *= np.uint64(0x94D049BB133111EB)
        words ^= words >> np.uint64(31)
        return words.sum(axis=1, dtype=np.uint64)


def leakage(splits: dict[str, ImageStatistics]) -> dict[str, int]:
    """Images found in two splits (by their pixels' hash): a model evaluated on images it trained on."""
    names = [n for n in ("train", "validation", "test") if n in splits]
    unique = {n: splits[n].unique_hashes() for n in names}
    return {f"{a}/{b}": len(np.intersect1d(unique[a], unique[b], assume_unique=True))
            for i, a in enumerate(names) for b in names[i + 1:]}


def histogram_js(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon distance (base 2, 0..1) between two histograms of the same bins."""
    a, b = np.asarray(p, np.float64), np.asarray(q, np.float64)
    size = max(len(a), len(b))
    a, b = np.pad(a, (0, size - len(a))), np.pad(b, (0, size - len(b)))
    if a.sum() == 0 or b.sum() == 0:
        return 0.0 if a.sum() == b.sum() else 1.0
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x):
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return float(np.sqrt(max(0.0, (kl(a) + kl(b)) / 2)))


def psi(expected: list[float], actual: list[float], floor: float = 1e-4) -> float:
    """Population stability index between two histograms of the same bins (empty bins floored)."""
    e, a = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    size = max(len(e), len(a))
    e, a = np.pad(e, (0, size - len(e))), np.pad(a, (0, size - len(a)))
    e = np.maximum(e / max(e.sum(), 1), floor)
    a = np.maximum(a / max(a.sum(), 1), floor)
    return float(((a - e) * np.log(a / e)).sum())
