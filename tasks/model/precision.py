"""Which precision a model computes in: `auto` resolved from the hardware (bf16 where it is native, fp16 on older
tensor-core GPUs, else float32), and a model recast to another dtype policy (prediction in another precision, the
float32 copies the TFLite and ONNX exporters need)."""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import tensorflow as tf


def with_dtype_policy(model, policy: str):
    """The same model computing in `policy`, output activation kept in float32 (weights copied)."""

    def clone(layer):
        config = layer.get_config()
        if layer is not model.layers[-1] and "dtype" in config:  # operations inside a backbone (Add) have none
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    clone_ = keras.models.clone_model(model, clone_function=clone, recursive=True)  # a backbone's layers too
    clone_.set_weights(model.get_weights())
    return clone_


@dataclass
class HardwareProbe:
    """What the precision choice looks at. Tests inject their own."""

    cpu_flags: set[str] = field(default_factory=set)
    gpu_compute_capabilities: list[tuple[int, int]] = field(default_factory=list)


def probe_hardware() -> HardwareProbe:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        if details.get("compute_capability"):
            capabilities.append(tuple(details["compute_capability"]))
    return HardwareProbe(flags, capabilities)


def resolve_precision(requested: str, probe: HardwareProbe | None = None) -> tuple[str, str]:
    """(Keras dtype policy, why). `auto`: bf16 where the hardware computes it natively, fp16 on older
    tensor-core GPUs, else float32."""
    if requested != "auto":
        return requested, f"train.precision={requested} set in config"
    probe = probe or probe_hardware()
    if probe.gpu_compute_capabilities:
        lowest = min(probe.gpu_compute_capabilities)
        if lowest >= (8, 0):
            return "mixed_bfloat16", f"auto: GPUs of compute capability {lowest[0]}.{lowest[1]} (>= 8.0) have bf16 tensor cores"
        if lowest >= (7, 0):
            return "mixed_float16", f"auto: GPUs of compute capability {lowest[0]}.{lowest[1]} have fp16 tensor cores, not bf16"
        return "float32", f"auto: GPUs of compute capability {lowest[0]}.{lowest[1]} (< 7.0) have no tensor cores"
    native = sorted(probe.cpu_flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return "mixed_bfloat16", f"auto: the CPU reports {', '.join(native)}"
    return "float32", "auto: no bf16 support reported by the CPU and no GPU"
