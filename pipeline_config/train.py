"""The train section: epochs, batch, loss, optimizer and learning-rate schedule, early stopping, phases, devices,
precision and the multi-worker settings; `auto` values resolved here, so fingerprints name what runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline_config.base import Section, validation_metric


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

    _monitor = field_validator("monitor")(validation_metric)


class EarlyStoppingConfig(Section):
    """Stop when a validation metric has not improved for `patience` epochs; publish the best epoch's weights."""

    enabled: bool = False
    monitor: str = "val_loss"
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0, description="the least change that counts as an improvement")
    restore_best: bool = Field(True, description="publish the best epoch's weights, not the last epoch's")

    _monitor = field_validator("monitor")(validation_metric)


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
