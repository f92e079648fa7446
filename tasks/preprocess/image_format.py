"""What every image becomes (ImageFormat: size, resize, interpolation, channels), and the facts about encoded images
that both decoders go by: the size limit, the grey modes, the bytes that start an image file."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline_config import DataConfig
from tasks.errors import PipelineError

# Encoded images are checked against their header before any pixel is decoded: at most this many pixels (a
# 60,000 x 60,000 PNG is a few MB on disk and 3.6 GB decoded).
MAX_ENCODED_PIXELS = 4096 * 4096
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # every other mode has colour (P counts as colour)
# The first bytes of the formats read here: bytes that start so are an image, however broken.
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
EXIF_ORIENTATION, SWAPS_SIDES = 0x0112, (5, 6, 7, 8)  # orientations that turn the image a quarter


class NotAnImage(PipelineError):
    """The bytes are no image format Pillow knows (a text file in an image folder): skipped, not 'bad'."""


@dataclass(frozen=True)
class ImageFormat:
    """What every image becomes. `size` (height, width): the target, or None to keep each image's own size (then
    all must agree). `channels`: 1 (grayscale), 3 (rgb), or None to keep what the image has."""

    size: tuple[int, int] | None = None
    resize: str = "stretch"  # stretch | crop | pad
    interpolation: str = "bilinear"  # nearest | bilinear | bicubic | lanczos | area
    channels: int | None = None

    def settings(self) -> dict:
        """The settings as the manifests record them (and prediction reads them back)."""
        return {"image_size": list(self.size) if self.size else None, "resize": self.resize,
                "interpolation": self.interpolation, "channels": self.channels}

    @classmethod
    def from_settings(cls, settings: dict | None) -> "ImageFormat":
        if not settings:
            return cls()
        size = settings.get("image_size")
        return cls(tuple(size) if size else None, settings.get("resize", "stretch"),
                   settings.get("interpolation", "bilinear"), settings.get("channels"))


def configured_channels(cfg: DataConfig) -> int | None:
    """data.color_mode as a channel count; None for auto (found from the images)."""
    return {"rgb": 3, "grayscale": 1}.get(cfg.color_mode)


def image_format(cfg: DataConfig, channels: int | None) -> ImageFormat:
    return ImageFormat(tuple(cfg.image_size) if cfg.image_size else None, cfg.resize, cfg.interpolation, channels)
