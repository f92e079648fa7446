"""The sections after training: the gate (`evaluate`), the serving formats (`export`) and batch prediction
(`predict`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline_config.base import Section


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
