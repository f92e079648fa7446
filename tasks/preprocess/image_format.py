"""What every image becomes (ImageFormat: size, resize, interpolation, channels, the largest image decoded), as
the data config asks and the manifests record it, and the bytes that start an image file."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline_config import DataConfig
from tasks.errors import PipelineError

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # every other mode has colour (P counts as colour)
# The first bytes of the formats read here: bytes that start so are an image, however broken.
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
DEFAULT_MAX_PIXELS = DataConfig.model_fields["max_image_pixels"].default  # the config's, for manifests without it


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
    max_pixels: int = DEFAULT_MAX_PIXELS  # an image whose header declares more is refused before it is decoded

    def settings(self) -> dict:
        """The settings as the manifests record them (and prediction and the serving graph read them back)."""
        return {"image_size": list(self.size) if self.size else None, "resize": self.resize,
                "interpolation": self.interpolation, "channels": self.channels, "max_pixels": self.max_pixels}

    @classmethod
    def from_settings(cls, settings: dict | None) -> "ImageFormat":
        if not settings:
            return cls()
        size = settings.get("image_size")
        return cls(tuple(size) if size else None, settings.get("resize", "stretch"),
                   settings.get("interpolation", "bilinear"), settings.get("channels"),
                   settings.get("max_pixels", DEFAULT_MAX_PIXELS))


def configured_channels(cfg: DataConfig) -> int | None:
    """data.color_mode as a channel count; None for auto (found from the images)."""
    return {"rgb": 3, "grayscale": 1}.get(cfg.color_mode)


def image_format(cfg: DataConfig, channels: int | None) -> ImageFormat:
    return ImageFormat(tuple(cfg.image_size) if cfg.image_size else None, cfg.resize, cfg.interpolation, channels,
                       cfg.max_image_pixels)


def model_format(settings: dict | None, image_shape: list[int]) -> ImageFormat:
    """How any image becomes a published model's input, in prediction and in the serving graph alike: as ingest
    made its training images (the dataset's settings, recorded in the model's manifest), in the model's channels;
    a dataset that kept its images' own size stretches them to the model's."""
    fmt = ImageFormat.from_settings(settings)
    size = fmt.size or tuple(image_shape[:2])
    return ImageFormat(size, fmt.resize if fmt.size else "stretch", fmt.interpolation, image_shape[-1],
                       fmt.max_pixels)


def array_format(settings: dict | None, image_shape: list[int]) -> ImageFormat:
    """How pixel arrays (Parquet's raw pixels, an npz) become a published model's input: as ingest made the
    dataset's arrays, in the model's channels; a dataset that kept its own size takes arrays of the model's size
    only, as its `serving_default` signature does."""
    fmt = ImageFormat.from_settings(settings)
    return ImageFormat(fmt.size, fmt.resize, fmt.interpolation, image_shape[-1], fmt.max_pixels)
