"""The one configuration schema of tfpipe.

Every stage reads its own section (`data`, `model`, `train`, `evaluate`, `predict`, `artifacts`,
`schedule`, `serve`, `tune`, `tracking`). A config is the default YAML, optionally a user YAML merged over it, then dotted
`--set key=value` overrides. Unknown keys and wrong types are rejected before any work is done.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.yaml")
SOURCE_SCHEMES = ("mnist", "parquet:", "npz:", "tfds:", "folder:")


# The seed's basic_cnn, layer for layer, with lighter dropout after the two convolution blocks (0.1 and 0.25
# where the seed has 0.5): with augmentation doing part of the regularising, the seed's rates under-fit in 10
# epochs (the default schedule and augmentation in a plain script, three seeds: 99.61% each; the seed's rates
# with two of those seeds: 99.53% and 99.57%). The input shape and the output head (Dense(num_classes) +
# softmax, or Dense(1) + sigmoid for binary crossentropy) come from the dataset and the loss.
def _conv(filters: int) -> dict:
    return {"type": "Conv2D", "filters": filters, "kernel_size": 3, "strides": 1, "padding": "same"}


def _dropout(rate: float) -> dict:
    return {"type": "Dropout", "rate": rate}


_RELU = {"type": "Activation", "activation": "relu"}
_POOL = {"type": "MaxPool2D", "pool_size": 2, "strides": 2}
DEFAULT_LAYERS = [_conv(32), _RELU, _conv(32), _RELU, _POOL, _RELU, _dropout(0.1),
                  _conv(64), _RELU, _POOL, _RELU,
                  _conv(128), _RELU, _POOL, _RELU, _dropout(0.25),
                  {"type": "Flatten"}, {"type": "Dense", "units": 512}, _RELU, _dropout(0.5)]


class ConfigError(Exception):
    """A configuration the user must fix. Its message is one line that names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


VALIDATION_METRICS = ("val_loss", "val_accuracy", "val_precision", "val_recall")


def _validation_metric(value: str) -> str:
    if value not in VALIDATION_METRICS:
        raise ValueError(f"monitor a validation metric: one of {', '.join(VALIDATION_METRICS)}")
    return value


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
    limit: int | None = Field(None, ge=1, description="use only the first N examples of each split")
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
        "bilinear", description="the resize filter (antialiased when shrinking)")
    color_mode: Literal["auto", "rgb", "grayscale"] = Field(
        "auto", description="auto: a folder is rgb when any image has colour; other sources keep each image's own")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="folder with no train/ and test/: the share "
                                 "of files (a seeded hash of the path) in the test split")
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


class LayerSpec(BaseModel):
    """One layer: `type` plus the Keras constructor arguments of that layer."""

    model_config = ConfigDict(extra="allow")
    type: str


BACKBONES = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0", "EfficientNetB1", "EfficientNetB2",
             "EfficientNetB3", "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "ResNet50V2", "ConvNeXtTiny")


class BackboneConfig(Section):
    """A keras.applications network under the head (model.layers are then not used)."""

    name: Literal[BACKBONES]  # type: ignore[valid-type]
    weights: str | None = Field(None, description="null (random), a local or bucket path to a weights file of the "
                                "network without its top (its sha256 is part of the model's fingerprint), or "
                                "imagenet (Keras' download, or its copy in ~/.keras/models)")
    pooling: Literal["avg", "max"] = "avg"
    dropout: float = Field(0.2, ge=0, lt=1, description="before the head")


class ModelCardConfig(Section):
    """What the model card says that no run can measure (not part of the model's fingerprint)."""

    intended_use: str = "not stated: set model.card.intended_use"
    limitations: str = "not stated: set model.card.limitations"
    owners: list[str] = Field(default_factory=list)


class ModelConfig(Section):
    name: str = "basic_cnn"
    layers: list[LayerSpec] = Field(default_factory=lambda: [LayerSpec(**layer) for layer in DEFAULT_LAYERS])
    backbone: BackboneConfig | None = None
    card: ModelCardConfig = Field(default_factory=ModelCardConfig)


class OptimizerConfig(Section):
    name: Literal["sgd", "rmsprop", "adam"] = "adam"
    learning_rate: float = Field(2e-3, gt=0, description="the peak rate, reached after lr_schedule.warmup_epochs")
    momentum: float = Field(0.9, ge=0, description="sgd only")
    clipnorm: float | None = Field(None, gt=0, description="clip each gradient to this norm")
    weight_decay: float | None = Field(None, gt=0, description="decoupled weight decay (adam becomes AdamW)")


class LrScheduleConfig(Section):
    """The learning rate over training: the same Keras schedule object drives fit and the custom loop."""

    name: Literal["constant", "cosine", "step", "plateau"] = "cosine"
    warmup_epochs: float | Literal["auto"] = Field(
        "auto", description="cosine: linear warm-up from 0 to learning_rate; auto: 1 epoch, or a tenth of "
        "train.epochs when that is shorter (quick runs); 0 for the other schedules")

    @field_validator("warmup_epochs")
    @classmethod
    def _non_negative(cls, value: float | str) -> float | str:
        if value != "auto" and value < 0:
            raise ValueError("warmup_epochs must be >= 0 (or auto)")
        return value
    min_lr: float = Field(0.0, ge=0, description="cosine: the rate it decays to; plateau: the lowest rate")
    boundaries: list[int] = Field(default_factory=list, description="step: epochs after which the rate drops")
    factor: float = Field(0.1, gt=0, lt=1, description="step, plateau: the rate is multiplied by this at each drop")
    monitor: str = Field("val_loss", description="plateau: the validation metric watched")
    patience: int = Field(2, ge=1, description="plateau: epochs without improvement before the rate drops")
    min_delta: float = Field(0.0, ge=0, description="plateau: the least change that counts as an improvement")

    _monitor = field_validator("monitor")(_validation_metric)


class EarlyStoppingConfig(Section):
    """Stop when a validation metric has not improved for `patience` epochs; publish the best epoch's weights."""

    enabled: bool = False
    monitor: str = "val_loss"
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0, description="the least change that counts as an improvement")
    restore_best: bool = Field(True, description="publish the best epoch's weights, not the last epoch's")

    _monitor = field_validator("monitor")(_validation_metric)


class PhaseConfig(Section):
    """One stage of training with its own trainable set and learning rate (train.phases)."""

    epochs: int = Field(ge=1)
    trainable: str = Field("all", pattern=r"^(head|all|top:[1-9][0-9]*|from:.+)$", description=(
        "head (the backbone frozen) | all | top:N (the backbone's last N layers and the head) | from:LAYER_NAME"))
    learning_rate: float | None = Field(None, gt=0, description="default: train.optimizer.learning_rate")
    lr_schedule: LrScheduleConfig | None = Field(None, description="default: train.lr_schedule (plateau: not in "
                                                 "phases)")


def _resolve_warmup(schedule: "LrScheduleConfig", epochs: int, where: str) -> None:
    """`auto` warm-up becomes a number (so fingerprints and artifacts name it): 1 epoch, or a tenth of the
    epochs when shorter, for cosine; none otherwise. Then the warm-up must leave epochs to decay over."""
    if schedule.warmup_epochs == "auto":
        schedule.warmup_epochs = min(1.0, epochs / 10) if schedule.name == "cosine" else 0.0
    if schedule.name == "cosine" and schedule.warmup_epochs >= epochs:
        raise ValueError(f"{where}.warmup_epochs={schedule.warmup_epochs:g} leaves no epoch to decay over "
                         f"({epochs} epochs): use fewer warm-up epochs")
    if schedule.warmup_epochs and schedule.name != "cosine":
        raise ValueError(f"{where}.warmup_epochs is for the cosine schedule, not {schedule.name}: set "
                         f"{where}.name=cosine or drop the warm-up")


class TrainConfig(Section):
    mode: Literal["auto", "fit", "custom"] = Field(
        "auto", description="auto: fit on one machine, custom under multi_worker (the only style that works there)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1, description="global batch size, split across replicas")
    loss: Literal["sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy"] = (
        "sparse_categorical_crossentropy")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LrScheduleConfig = Field(default_factory=LrScheduleConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="categorical and binary crossentropy only")
    class_weight: Literal["none", "balanced"] | dict[int, float] = Field(
        "none", description="balanced: n / (classes * count) from the dataset's class histogram; or {class: weight}")
    strategy: Literal["auto", "mirrored", "one_device", "multi_worker"] = "auto"
    devices: list[str] | None = None
    cpu_replicas: int | None = Field(None, ge=1)
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    seed: int = 42
    deterministic: bool = False
    local_workers: int | None = Field(None, ge=1, description="start N multi_worker processes on this machine")
    collective_timeout_s: float = Field(60.0, gt=0, description="multi_worker: how long to wait for a lost worker")
    worker_wait_s: float = Field(3600.0, gt=0, description="multi_worker: how long the workers wait for each other "
                                 "outside training steps (the chief's ingest and publishing, a slow start)")
    phases: list[PhaseConfig] = Field(default_factory=list, description="train in phases (freeze, then fine-tune); "
                                      "train.epochs is then their sum")
    init_from: str | None = Field(None, description="champion, a model fingerprint or directory: start from its "
                                  "weights (layers matched by name)")
    bn_recalibration_batches: int = Field(50, ge=0, description="after training, the moving statistics of the "
                                          "BatchNormalization layers that trained are recomputed on this many "
                                          "training batches with the final weights (0: off)")

    # Two questions, each answered here only. `multi_worker`: does this run train on several workers (their
    # fingerprint and style)? `in_cluster`: is this process one of those workers (TF_CONFIG says which), as
    # opposed to a single process or a `local_workers` launcher that starts them and reads their result?
    @property
    def multi_worker(self) -> bool:
        return self.in_cluster or bool(self.local_workers)

    @property
    def in_cluster(self) -> bool:
        return self.strategy == "multi_worker"

    @model_validator(mode="before")
    @classmethod
    def _epochs_of_phases(cls, data: Any) -> Any:
        """With phases, train.epochs is their sum, whatever it was set to (every epoch count downstream reads it)."""
        phases = data.get("phases") if isinstance(data, dict) else None
        if not phases or not all(isinstance(p, (dict, PhaseConfig)) for p in phases):
            return data  # no phases, or malformed ones the field's validation names
        epochs = [p.get("epochs") if isinstance(p, dict) else p.epochs for p in phases]
        return {**data, "epochs": sum(epochs)} if all(isinstance(e, int) and e >= 1 for e in epochs) else data

    @model_validator(mode="before")
    @classmethod
    def _resolve_mode(cls, data: Any) -> Any:
        """`auto` becomes the style that actually runs, so fingerprints and artifacts name it."""
        if isinstance(data, dict) and data.get("mode", "auto") == "auto":
            multi = data.get("strategy") == "multi_worker" or bool(data.get("local_workers"))
            return {**data, "mode": "custom" if multi else "fit"}
        return data

    @model_validator(mode="after")
    def _compatible(self) -> "TrainConfig":
        for i, phase in enumerate(self.phases):  # a phase's schedule spans the phase: train's, unless it sets one
            if phase.lr_schedule is None:
                phase.lr_schedule = self.lr_schedule.model_copy(deep=True)
            if phase.lr_schedule.name == "plateau":
                raise ValueError(f"train.phases[{i}]: the plateau schedule spans the run, not a phase: use constant, "
                                 "cosine or step in phases")
            _resolve_warmup(phase.lr_schedule, phase.epochs, f"train.phases[{i}].lr_schedule")
        _resolve_warmup(self.lr_schedule, self.epochs, "train.lr_schedule")
        if self.multi_worker and self.mode == "fit":
            raise ValueError("train.mode=fit cannot run under multi_worker: Keras 3 model.fit fails under "
                             "MultiWorkerMirroredStrategy (keras-team/keras#20585); use train.mode=custom (or auto)")
        if isinstance(self.class_weight, dict) and any(k < 0 or w <= 0 for k, w in self.class_weight.items()):
            raise ValueError("train.class_weight: classes are indices >= 0 and weights are > 0")
        if self.label_smoothing and self.loss == "sparse_categorical_crossentropy":
            raise ValueError("train.label_smoothing needs one-hot labels: use train.loss=categorical_crossentropy")
        if self.cpu_replicas and self.strategy == "one_device":
            raise ValueError("cpu_replicas mirrors over several CPU devices: it cannot be used with strategy one_device")
        if self.cpu_replicas and self.strategy == "multi_worker":
            raise ValueError("cpu_replicas cannot be combined with strategy multi_worker: each worker trains on its own devices")
        return self


ANOMALY_ACTIONS = {"leakage": "fail", "schema": "warn", "drift": "warn", "duplicates": "warn", "blank": "warn"}
ANOMALY_KINDS = tuple(ANOMALY_ACTIONS)
# The validate section and its schema key shadow pydantic's deprecated v1 classmethods of those names (nothing here
# calls them): the names users read in the docs win over a warning at every start.
warnings.filterwarnings("ignore", message=r'Field name "(schema|validate)" in "(ValidateConfig|PipelineConfig)" shadows',
                        category=UserWarning)


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


class EvaluateConfig(Section):
    min_accuracy: float = Field(0.9, ge=0, le=1)
    min_macro_f1: float = Field(0.0, ge=0, le=1)
    max_regression: float = Field(0.005, ge=0, le=1, description="how much lower the challenger's accuracy may be")
    block_on_anomalies: bool = Field(False, description="refuse a model whose training data had anomalies "
                                     "(validate.on_anomaly: warn)")
    batch_size: int = Field(1024, ge=1)


class ExportConfig(Section):
    """What train writes beside model.keras, each checked against Keras on test images before publishing."""

    formats: list[Literal["saved_model", "tflite", "onnx"]] = Field(
        default_factory=lambda: ["saved_model"], description="saved_model (two signatures: uint8 images, encoded "
        "bytes), tflite (LiteRT), onnx; a published model missing one gets it on the next run")
    tflite_quantization: Literal["none", "dynamic", "float16", "int8"] = Field(
        "none", description="int8 calibrates on training images")
    parity_samples: int = Field(512, ge=1, description="test images each format is checked on against Keras")
    min_label_agreement: float = Field(0.999, ge=0, le=1, description="a format agreeing with Keras on fewer "
                                       "labels than this fails the stage")
    min_label_agreement_int8: float = Field(0.99, ge=0, le=1, description="the same for int8-quantized TFLite")


class PredictConfig(Section):
    input: str | None = None
    batch_size: int = Field(1024, ge=1)
    precision: Literal["model", "auto", "float32", "mixed_bfloat16", "mixed_float16"] = Field(
        "model", description="model: compute as the model was trained (the evaluation's numbers)")
    key_columns: list[str] = Field(default_factory=list)
    allow_unblessed: bool = False
    engine: Literal["local", "dask"] = Field(
        "local", description="local: one process streams one input; dask: one task per input file on a Dask cluster")
    dask_address: str | None = Field(None, description="an existing scheduler (tcp://host:8786); unset: a LocalCluster")
    dask_workers: int | None = Field(None, ge=1, description="LocalCluster worker processes (default: the CPU count)")
    allow_partial: bool = Field(False, description="dask: write the manifest even when some input files failed")
    on_drift: Literal["warn", "fail"] = Field("warn", description="inputs unlike the model's data: warn, or fail "
                                              "and publish nothing")
    drift_max_js_distance: float = Field(0.15, ge=0, le=1, description="drift: Jensen-Shannon distance of a "
                                         "figure's histogram from the model's data")
    drift_max_psi: float = Field(0.5, ge=0, description="drift: population stability index of the same")
    drift_min_images: int = Field(200, ge=1, description="fewer input images than this: drift is not judged")


class ArtifactsConfig(Section):
    root: str = Field("./artifacts", validate_default=True)
    local_cache: str = Field("~/.cache/tfpipe", description="local copies of remote artifacts (staged shards, "
                             "models) and training work dirs when the root is a bucket; never the working directory")
    keep_last: int = Field(3, ge=1, description="tfpipe gc keeps the newest N published outputs of each stage")
    stale_work_hours: float = Field(24.0, gt=0, description="tfpipe gc removes training work dirs idle this long")

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """Local roots become absolute, so deployments and subprocesses agree on one place."""
        return _absolute_place(value)


class ScheduleConfig(Section):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"


def _absolute_place(place: str) -> str:
    """A local place as an absolute path (a `file://` URL as its path: one form for every branch that follows);
    a URL as it is."""
    from tasks.storage import is_local

    place = place.removeprefix("file://")
    return os.path.abspath(os.path.expanduser(place)) if is_local(place) else place


def _absolute_places(places: list[str]) -> list[str]:
    return [_absolute_place(p) for p in places]


class ServeConfig(Section):
    """What a caller of the served deployments (`tfpipe serve`) may do. The artifact root is always allowed for
    reading and writing; the artifact root, the config file and the `serve` section cannot be changed by a caller.
    Relative places are taken from the directory `tfpipe serve` starts in."""

    allowed_inputs: list[str] = Field(default_factory=lambda: ["data"], validate_default=True,
                                      description="directories or URL prefixes a served prediction may read")
    allowed_outputs: list[str] = Field(default_factory=lambda: ["data"], validate_default=True,
                                       description="directories or URL prefixes a served prediction may write")
    allowed_overrides: list[str] = Field(default_factory=lambda: ["train.epochs", "data.limit"],
                                         description="config keys a caller may set in `overrides`")

    _places = field_validator("allowed_inputs", "allowed_outputs")(_absolute_places)


class SearchDimension(Section):
    """One key of tune.search_space: a range (float, or int when low and high are whole numbers) or choices."""
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="sample the range on a log scale")
    step: float | None = Field(None, gt=0, description="a range in steps of this (grid: the grid's spacing)")
    choices: list[Any] | None = Field(None, min_length=1, description="categorical: one of these values")

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SearchDimension":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low and high, not both")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError("give choices, or low < high")
        elif self.log and self.low <= 0:
            raise ValueError("log: low must be > 0")
        elif self.log and self.step:
            raise ValueError("log and step exclude each other")
        if self.choices is not None and not all(isinstance(c, (str, int, float, bool)) for c in self.choices):
            raise ValueError("choices are numbers, strings or booleans")
        return self

    @property
    def integer(self) -> bool:
        return self.choices is None and all(float(v).is_integer() for v in (self.low, self.high, self.step or 1))


# keys a trial may not change: where results go, what the study is, and the stages after training
_NOT_TUNABLE = ("tune.", "tracking.", "artifacts.", "rerun", "validate.", "evaluate.", "predict.", "schedule.", "serve.",
                "train.strategy", "train.local_workers")
_METRICS = ("loss", "accuracy", "precision", "recall")


class TuneConfig(Section):
    """tfpipe tune: Optuna trials, each the ordinary train stage with the trial's config (tasks/tuning.py)."""
    search_space: dict[str, SearchDimension] = Field(default_factory=dict, description="dotted config key -> "
                                                     "{low, high, log, step} or {choices}")
    objective: str = Field("val_accuracy", description="the epoch metric a trial is judged by")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="default: minimize for losses, "
                                                              "else maximize")
    trials: int = Field(8, ge=1, description="trials in the study, all runs of it together")
    parallel: int = Field(2, ge=1, description="trials at once, one per Dask worker")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruning_startup_trials: int = Field(2, ge=0, description="median: finished trials before any is pruned")
    warmup_epochs: int = Field(0, ge=0, description="median: epochs of a trial never pruned")
    seed: int = Field(0, description="the sampler's seed")
    timeout: float | None = Field(None, gt=0, description="seconds after which no new trial starts")
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="trials run first, as {key: value} "
                                          "(a known good config, say)")
    storage: str | None = Field(None, description="an Optuna database URL (postgresql://user@host/db, sqlite:///f); "
                                "null: a journal file under the artifact root (one machine)")
    dask_address: str | None = Field(None, description="an existing scheduler (tcp://host:8786); null: a "
                                     "LocalCluster of `parallel` workers")

    @field_validator("objective")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        known = [f"{prefix}{m}" for prefix in ("val_", "") for m in _METRICS]
        if value not in known:
            raise ValueError(f"one of {', '.join(known)}")
        return value

    @field_validator("search_space")
    @classmethod
    def _tunable(cls, space: dict) -> dict:
        for key in space:
            if key.startswith(_NOT_TUNABLE) or key in _NOT_TUNABLE:
                raise ValueError(f"{key} cannot be tuned (a trial trains one model where the study says)")
        return space

    @model_validator(mode="after")
    def _grid_is_discrete(self) -> "TuneConfig":
        if self.sampler == "grid":
            for key, dim in self.search_space.items():
                if dim.choices is None and not dim.step:
                    raise ValueError(f"tune.sampler=grid: tune.search_space.{key} needs choices or a step")
        return self

    @property
    def maximize(self) -> bool:
        return (self.direction or ("minimize" if self.objective.endswith("loss") else "maximize")) == "maximize"


class TrackingConfig(Section):
    mlflow_uri: str | None = Field(None, description="log every training run to this MLflow tracking server "
                                   "(pip install 'tfpipe[mlflow]'); a tracker that fails never fails the run")
    experiment: str = Field("tfpipe", description="the MLflow experiment the runs go to")


STAGES = ("ingest", "validate", "train", "evaluate", "predict")


class PipelineConfig(Section):
    rerun: Literal["none", "ingest", "validate", "train", "evaluate", "predict", "all"] = Field(
        "none", description="rebuild this stage and every stage after it even when its output is published")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validate: ValidateConfig = Field(default_factory=ValidateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _search_space_keys(self) -> "PipelineConfig":
        """Every tuned key names a config value that takes each end of its range (each choice): a bad space fails
        here, not in its first trial."""
        base = self.model_dump(mode="json", exclude={"tune"})
        for key, dim in self.tune.search_space.items():
            for value in dim.choices if dim.choices is not None else (dim.low, dim.high):
                value = int(value) if dim.integer else value
                tree = copy.deepcopy(base)
                try:
                    _set_dotted(tree, key.split("."), value)
                    PipelineConfig.model_validate(tree)
                except (ConfigError, ValidationError) as exc:
                    text = validation_message(exc) if isinstance(exc, ValidationError) else str(exc)
                    raise ValueError(f"tune.search_space: {key}={value!r}: {text.removeprefix('config error: ')}") from None
        return self

    def rebuilds(self, stage: str) -> bool:
        """Whether `rerun` asks for `stage` to be rebuilt: the stage named and every stage after it."""
        return self.rerun == "all" or (self.rerun != "none" and STAGES.index(stage) >= STAGES.index(self.rerun))


def fingerprint(value: Any) -> str:
    """sha256 of the canonical JSON of a config section (or any JSON-able value)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected a dotted key such as train.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str] | None:
    """The field names at `path` inside the schema, or None when the path is not a section."""
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return list(model.model_fields)


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        known = _known_keys(PipelineConfig, parts[:i])
        if known is not None and part not in known:
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1]), known))
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    known = _known_keys(PipelineConfig, parts[:-1])
    if known is not None and parts[-1] not in known:
        raise ConfigError(_unknown_key_message(".".join(parts), known))
    node[parts[-1]] = value


def _unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(known)})"
    return f"config error: {key}: unknown key{hint}"


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "layers":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config error: config file {path} not found: pass an existing YAML file to --config")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config error: {path}{where} is not valid YAML: fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path} must hold a mapping of sections (data, model, train, ...)")
    return data


def validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if not key:  # a check across sections: its message names the keys
        return f"config error: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "extra_forbidden":
        parent = [str(p) for p in err["loc"][:-1]]
        known = _known_keys(PipelineConfig, parent) or []
        return _unknown_key_message(key, known)
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return f"config error: {key}: {msg}"


def user_settings(path: str | Path | None, overrides: dict[str, Any]) -> dict:
    """What a user set (a config file, then dotted overrides) as one nested mapping, without the defaults: the
    body of a preset that gives the same config through --config."""
    tree = _read_yaml(Path(path)) if path else {}
    for key, value in overrides.items():
        _set_dotted(tree, key.split("."), value)
    return tree


ENV_PREFIX = "TFPIPE__"


def environment_overrides() -> dict[str, tuple[list[str], Any]]:
    """Settings from the environment, as a container or a scheduler sets them: TFPIPE__TRAIN__EPOCHS=3 is
    `--set train.epochs=3` (the value read as YAML, sections joined by a double underscore); by variable name.
    TFPIPE_ARTIFACTS, the older spelling of TFPIPE__ARTIFACTS__ROOT, comes first (the value as it is)."""
    items = {}
    if os.environ.get("TFPIPE_ARTIFACTS"):
        items["TFPIPE_ARTIFACTS"] = (["artifacts", "root"], os.environ["TFPIPE_ARTIFACTS"])
    for name, raw in sorted(os.environ.items()):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = ".".join(name[len(ENV_PREFIX):].lower().split("__"))
            try:
                items[name] = parse_override(f"{key}={raw}")
            except ConfigError:
                raise ConfigError(f"config error: environment variable {name}: expected TFPIPE__SECTION__KEY=VALUE, "
                                  "e.g. TFPIPE__TRAIN__EPOCHS=3") from None
    return items


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Default YAML, then `path` merged over it, then the environment (TFPIPE_ARTIFACTS, TFPIPE__SECTION__KEY),
    then dotted overrides; validated.

    Raises ConfigError with one line naming the offending key.
    """
    tree = _read_yaml(DEFAULT_CONFIG_PATH)
    if path:
        tree = _merge(tree, _read_yaml(Path(path)))
    items: list[tuple[list[str], Any]]
    if isinstance(overrides, dict):
        items = [(k.split("."), v) for k, v in overrides.items()]
    else:
        items = [parse_override(o) for o in overrides or []]
    environment = environment_overrides()  # the environment beats the files, an explicit --set beats it
    for name, (parts, value) in environment.items():
        try:
            _set_dotted(tree, parts, value)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (set by the environment variable {name})") from None
    for parts, value in items:
        _set_dotted(tree, parts, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        named = [name for name, (parts, _) in environment.items() if f"{where}.".startswith(".".join(parts) + ".")]
        raise ConfigError(validation_message(exc) + (f" (set by the environment variable {named[0]})" if named
                                                     else "")) from None
