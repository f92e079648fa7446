"""The data sections: where the images come from and what ingest makes of them (`data`, with `data.augment`), and
what the validate stage checks them against (`validate`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline_config.base import Section

SOURCE_SCHEMES = ("mnist", "parquet:", "npz:", "tfds:", "folder:")


class AugmentConfig(Section):
    """Random changes to the training images only (never validation, test or prediction; not in the saved
    model), with the meaning of keras.layers.RandomTranslation, RandomRotation, RandomZoom, RandomContrast and
    RandomFlip. 0 turns one off."""

    translation: float = Field(0.08, ge=0, lt=1, description="shift by up to this fraction of the height and width")
    rotation: float = Field(0.03, ge=0, le=0.5, description="rotate by up to this fraction of a full turn")
    zoom: float = Field(0.08, ge=0, lt=1, description="scale by 1 +- this (above 1 zooms out)")
    contrast: float = Field(0.0, ge=0, le=1, description="scale the contrast by 1 +- this")
    flip: bool = Field(False, description="mirror left-right at random (digits must not flip)")
    fill_mode: Literal["constant", "reflect", "nearest", "wrap"] = Field(
        "constant", description="what fills pixels moved in from outside the image (constant: 0)")

    @property
    def enabled(self) -> bool:
        return bool(self.translation or self.rotation or self.zoom or self.contrast or self.flip)


class DataConfig(Section):
    source: str = "mnist"
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    shards: int = Field(4, ge=1)
    seed: int = 42
    image_column: str = "image"
    label_column: str = "label"
    image_shape: list[int] | None = None
    limit: int | None = Field(None, ge=1, description="use only N examples of each split: a folder's, a seeded "
                              "sample keeping every class; other sources', the first N")
    shuffle_buffer: int = Field(60000, ge=1)
    tfds_data_dir: str | None = None
    tfds_download: bool = False
    ingest_batch_rows: int = Field(10000, ge=1, description="rows decoded and written at a time: bounds ingest memory")
    split_key: str | None = Field(None, description="Parquet column hashed for the validation split (default: row index)")
    verify_source: Literal["metadata", "full"] = Field(
        "metadata", description="Parquet and folder source hash: sizes and mtimes or ETags (metadata) or every "
        "byte (full)")
    # Images of any size and mode (folder sources, encoded images in Parquet), made one shape once, at ingest.
    image_size: list[int] | None = Field(None, description="[height, width] every image is resized to at ingest")
    resize: Literal["stretch", "crop", "pad"] = Field(
        "stretch", description="to image_size: stretch | crop (centre, to the aspect ratio) | pad (fit, then black)")
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "area"] = Field(
        "bilinear", description="the resize filter (antialiased when a side shrinks two-fold or more)")
    max_image_pixels: int = Field(120_000_000, ge=1, description="an encoded image whose header declares more "
                                  "pixels is refused before it is decoded (at ingest, prediction and serving): "
                                  "100 MP photos pass, a 12,000 x 12,000 decompression bomb does not")
    color_mode: Literal["auto", "rgb", "grayscale"] = Field(
        "auto", description="auto: a folder is rgb when any image has colour; other sources keep each image's own")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="folder without a test/ directory: the share "
                                 "of files (a seeded hash of the content key) in the test split")
    class_names: list[str] | None = Field(None, description="folder: the classes in label order (default: the "
                                          "directory names, sorted); files of other classes are skipped")
    labels_file: str | None = Field(None, description="folder: a CSV or Parquet file of path,label[,split] rows "
                                    "(paths relative to the folder), instead of class directories")
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail", description="an image that cannot be decoded: fail naming it, or skip it (listed in the manifest)")
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description="skip: more bad images than this fails")
    cache_encoding: Literal["raw", "png", "jpeg"] = Field(
        "raw", description="how the cache stores pixels: raw bytes (fastest to read) or re-encoded (smaller)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value != "mnist" and not any(value.startswith(s) and len(value) > len(s) for s in SOURCE_SCHEMES[1:]):
            raise ValueError(f"unknown source {value!r}: use mnist, parquet:PATH, npz:PATH, tfds:NAME or folder:PATH")
        return value

    @field_validator("image_size")
    @classmethod
    def _size(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) != 2 or min(value) < 1):
            raise ValueError("image_size must be [height, width] of positive sizes")
        return value

    @field_validator("image_shape")
    @classmethod
    def _shape(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) not in (2, 3) or min(value) < 1):
            raise ValueError("image_shape must be [height, width] or [height, width, channels] of positive sizes")
        return value


ANOMALY_ACTIONS = {"leakage": "fail", "schema": "warn", "drift": "warn", "duplicates": "warn", "blank": "warn"}
ANOMALY_KINDS = tuple(ANOMALY_ACTIONS)


class ValidateConfig(Section):
    """The validate stage: the dataset's statistics (computed at ingest) against a schema and the champion's data."""
    schema: str | None = Field(None, description="a schema YAML (edit the schema.yaml a validation wrote); null: "
                               "inferred from the champion's dataset, or from this one when there is no champion")
    on_anomaly: dict[Literal[ANOMALY_KINDS], Literal["fail", "warn"]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(ANOMALY_ACTIONS), description="per kind of anomaly: fail the stage, or warn")
    max_js_distance: float = Field(0.1, ge=0, le=1, description="drift: Jensen-Shannon distance of class "
                                   "proportions and image-statistic histograms from the champion's data")
    max_psi: float = Field(0.25, ge=0, description="drift: population stability index of the same histograms")
    max_duplicate_fraction: float = Field(0.01, ge=0, le=1, description="exact duplicates within a split")
    max_blank_fraction: float = Field(0.01, ge=0, le=1, description="near-blank images in a split")

    @field_validator("on_anomaly")
    @classmethod
    def _every_kind(cls, value: dict) -> dict:  # a kind left out keeps its default action
        return {**ANOMALY_ACTIONS, **value}
