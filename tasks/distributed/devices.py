"""Where training runs: device set-up (logical CPU devices, GPU memory growth, thread pools) and the distribution
strategy; the precision is chosen in tasks/model/precision.py."""

from __future__ import annotations

import logging

import tensorflow as tf

from pipeline_config import TrainConfig
from tasks.distributed.cluster import multi_worker_strategy
from tasks.errors import PipelineError

log = logging.getLogger("tfpipe.devices")


def limit_threads(threads: int) -> None:
    """TensorFlow's thread pools sized to this worker's share of the cores (before its first op), so that N
    workers on one machine (Dask's, for prediction and tuning) do not oversubscribe it."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow already started in this process: its pools stay as they are


def configure_devices(cfg: TrainConfig) -> None:
    """Split the CPU into `cpu_replicas` logical devices, enable GPU memory growth, and under multi_worker create
    the process's MultiWorkerMirroredStrategy (collectives must be configured at start-up).

    Must run before the first TensorFlow op of the process; the CLI, the flows and the worker call it first thing.
    """
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised: the setting from the first call stands
    if cfg.in_cluster:
        multi_worker_strategy(cfg)
        return
    if cfg.cpu_replicas:
        cpu = tf.config.list_physical_devices("CPU")[0]
        current = tf.config.get_logical_device_configuration(cpu)
        if current is not None and len(current) == cfg.cpu_replicas:
            return
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.cpu_replicas)
        except RuntimeError:
            have = len(tf.config.list_logical_devices("CPU"))
            if have != cfg.cpu_replicas:
                raise PipelineError(f"train.cpu_replicas={cfg.cpu_replicas} must be set before TensorFlow starts, and "
                                    f"this process already runs with {have} CPU device(s): start a fresh process") from None


def make_strategy(cfg: TrainConfig) -> tf.distribute.Strategy:
    if cfg.in_cluster:
        return multi_worker_strategy(cfg)
    gpus = tf.config.list_logical_devices("GPU")
    if cfg.cpu_replicas:
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")][: cfg.cpu_replicas]
        if len(cpus) < cfg.cpu_replicas:
            raise PipelineError(f"train.cpu_replicas={cfg.cpu_replicas} but only {len(cpus)} CPU device(s) exist: "
                                "start a fresh process so they can be configured")
        return tf.distribute.MirroredStrategy(cpus)
    if cfg.strategy == "mirrored":
        return tf.distribute.MirroredStrategy(_checked(cfg.devices) if cfg.devices else None)
    if cfg.strategy == "one_device":
        device = _checked(cfg.devices)[0] if cfg.devices else ("/gpu:0" if gpus else "/cpu:0")
        return tf.distribute.OneDeviceStrategy(device)
    if gpus:  # auto: every GPU there is
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _checked(devices: list[str]) -> list[str]:
    def key(name: str) -> tuple[str, int]:
        spec = tf.DeviceSpec.from_string(name)
        return (spec.device_type or "").upper(), spec.device_index or 0

    known = {key(d.name): d.name for d in tf.config.list_logical_devices()}
    for device in devices:
        if key(device) not in known:
            raise PipelineError(f"train.devices: {device!r} does not exist here (devices: "
                                f"{', '.join(sorted(known.values()))}): name existing devices")
    return devices


def strategy_devices(strategy: tf.distribute.Strategy) -> list[str]:
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: whatever device TensorFlow places ops on
        gpus = tf.config.list_logical_devices("GPU")
        return [(gpus or tf.config.list_logical_devices("CPU"))[0].name]


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The strategy's public name (TensorFlow's MultiWorkerMirroredStrategy is a CollectiveAllReduceStrategy)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    name = type(strategy).__name__
    return "default (single device)" if name.startswith("_Default") else name
