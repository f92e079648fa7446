"""One measurement per process (TensorFlow's device set-up and dtype policy are per process).

    python -m bench.worker NAME '{"json": "arguments"}'

Prints one JSON line with the result as its last line of stdout.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import flows  # noqa: E402,F401  (environment defaults)


def _config(root: str, *overrides: str):
    from pipeline_config import load_config

    return load_config(overrides=[f"artifacts.root={root}", *overrides])


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def ingest(args: dict) -> dict:
    """Full embedded MNIST into a fresh cache, repeated; then the reader against from_tensor_slices."""
    import tensorflow as tf

    from bench.bare_keras import load
    from tasks.data.ingest import ingest as run_ingest
    from tasks.data.reader import make_dataset

    tf.constant(0)  # TensorFlow's one-time start-up is not ingestion
    rates = []
    for _ in range(args.get("repeats", 3)):
        with tempfile.TemporaryDirectory() as root:
            cfg = _config(root)
            started = time.perf_counter()
            dataset = run_ingest(cfg.data, cfg.artifacts.root)
            rates.append(sum(dataset.counts.values()) / (time.perf_counter() - started))
    root = tempfile.mkdtemp()
    cfg = _config(root)
    dataset = run_ingest(cfg.data, cfg.artifacts.root)
    x, y = load("train", dataset.counts["train"])  # normalised up front, as the seed does

    def drain(ds) -> float:
        started = time.perf_counter()
        n = sum(int(labels.shape[0]) for _, labels in ds)
        return n / (time.perf_counter() - started)

    reader, memory = [], []
    for epoch in range(args.get("repeats", 3)):
        reader.append(drain(make_dataset(dataset, "train", 128, shuffle_buffer=10000, seed=epoch)))
        memory.append(drain(tf.data.Dataset.from_tensor_slices((x, y)).shuffle(10000, seed=epoch).batch(128)
                            .prefetch(tf.data.AUTOTUNE)))
    return {"ingest_images_per_second": statistics.median(rates), "ingest_runs": rates,
            "reader_images_per_second": statistics.median(reader), "in_memory_images_per_second": statistics.median(memory),
            "images": sum(dataset.counts.values())}


def ingest_scale(args: dict) -> dict:
    """One ingest of a Parquet source into a fresh root: images/s and the process's peak RSS."""
    import tensorflow as tf

    from tasks.data.ingest import ingest as run_ingest

    tf.constant(0)  # TensorFlow's one-time start-up is not ingestion
    with tempfile.TemporaryDirectory() as root:
        cfg = _config(root, f"data.source=parquet:{args['source']}")
        started = time.perf_counter()
        dataset = run_ingest(cfg.data, cfg.artifacts.root)
        seconds = time.perf_counter() - started
    images = sum(dataset.counts.values())
    return {"images": images, "seconds": seconds, "images_per_second": images / seconds, "peak_rss_mb": peak_rss_mb()}


def train(args: dict) -> dict:
    """The train stage on the cache; images/s from history.json (epochs after the first, median)."""
    root = args["root"]
    overrides = args.get("overrides", [])
    cfg = _config(root, *overrides)
    from tasks.distributed.devices import configure_devices

    configure_devices(cfg.train)
    from tasks.data.ingest import ingest as run_ingest
    from tasks.train.stage import train as run_train

    dataset = run_ingest(cfg.data, cfg.artifacts.root)
    started = time.perf_counter()
    model = run_train(cfg, dataset)
    seconds = time.perf_counter() - started
    history = json.load(open(f"{model.uri}/history.json"))["epochs"]
    rates = [h["images_per_second"] for h in history]
    return {"images_per_second": statistics.median(rates[1:] or rates), "epoch_rates": rates,
            "precision": model.precision, "replicas": model.replicas, "model_uri": model.uri, "stage_seconds": seconds,
            "train_images": dataset.counts["train"], "val_accuracy": history[-1].get("val_accuracy")}


def train_pairs(args: dict) -> dict:
    """The train stage against the bare Keras script in one process, in alternating rounds, so both see the same
    machine: per round, the stage in float32, the bare script (float32), the stage in `auto` precision, each for
    `epochs` epochs. Every epoch after a run's first (which pays for tracing) is one sample.

    On this kind of VM an epoch runs in one of two states, fast or slower with the CPUs partly idle (float32
    about 35-40% slower, bf16 about 20%), picked afresh for each epoch, oneDNN or not. So the ratio is taken
    state for state (fast epochs against fast epochs, the median of each), and over whole runs (total images /
    total seconds on each side, what a user waits for, which depends on how many slow epochs each side drew)."""
    import keras

    from bench.bare_keras import EpochTimer, basic_cnn, load
    from tasks.data.ingest import ingest as run_ingest
    from tasks.train.stage import train as run_train

    class CpuIdle(keras.callbacks.Callback):
        """The fraction of all CPUs' time spent idle during each epoch (from /proc/stat)."""

        def on_train_begin(self, logs=None):
            self.fractions = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = _cpu_times()

        def on_epoch_end(self, epoch, logs=None):
            delta = [b - a for a, b in zip(self.start, _cpu_times())]
            self.fractions.append(round((delta[3] + delta[4]) / max(1, sum(delta)), 3))  # idle + iowait

    root, limit, epochs = args["root"], args["limit"], args["epochs"]
    dataset = run_ingest(_config(root, f"data.limit={limit}").data, root)
    n = dataset.counts["train"]
    x, y = load("train", n)
    seconds: dict[str, list[float]] = {"float32": [], "bare": [], "auto": []}
    rounds, auto_precision, idle_by_rate = [], None, []
    for r in range(args["rounds"]):
        this_round = {}
        for kind in ("float32", "bare", "auto"):
            if kind == "bare":
                keras.utils.set_random_seed(r)
                model = basic_cnn()
                model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                              metrics=[keras.metrics.SparseCategoricalAccuracy()])
                timer, idle = EpochTimer(), CpuIdle()
                model.fit(x, y, batch_size=128, shuffle=True, epochs=epochs, callbacks=[timer, idle], verbose=0)
                epoch_seconds = timer.seconds
                idle_by_rate += [(round(n / s), f) for s, f in zip(epoch_seconds[1:], idle.fractions[1:])]
            else:
                cfg = _config(root, f"data.limit={limit}", f"train.epochs={epochs}", f"train.precision={kind}",
                              f"train.seed={r}")
                model_artifact = run_train(cfg, dataset)
                history = json.load(open(f"{model_artifact.uri}/history.json"))["epochs"]
                epoch_seconds = [h["train_seconds"] for h in history]
                if kind == "auto":
                    auto_precision = model_artifact.precision
            seconds[kind] += epoch_seconds[1:]
            this_round[kind] = [round(n / s) for s in epoch_seconds[1:]]
        rounds.append(this_round)

    def whole_run(kind: str) -> float:
        return n * len(seconds[kind]) / sum(seconds[kind])

    def by_state(kind: str) -> tuple[list[float], list[float]]:
        """(fast, slow) epochs: the two states differ by 20% or more, so within 15% of the side's best is fast.
        A quick run has too few epochs to be sure of both states on each side; the full run has 12 a side."""
        rates = [n / s for s in seconds[kind]]
        cut = 0.85 * max(rates)
        return [r for r in rates if r >= cut], [r for r in rates if r < cut]

    states = {k: by_state(k) for k in seconds}
    fast = {k: v[0] for k, v in states.items()}
    slow = {k: v[1] for k, v in states.items()}

    def state_ratio(state: dict) -> float | None:
        return statistics.median(state["auto"]) / statistics.median(state["bare"]) if state["auto"] and state["bare"] else None

    return {"rounds": rounds, "train_images": n, "epochs_per_run": epochs, "auto_precision": auto_precision,
            **{k: whole_run(k) for k in seconds},
            "float32_over_bare": whole_run("float32") / whole_run("bare"),
            "auto_over_bare": whole_run("auto") / whole_run("bare"),
            "fast_epochs": {k: [round(r) for r in v] for k, v in fast.items()},
            "slow_epochs": {k: [round(r) for r in v] for k, v in slow.items()},
            "auto_over_bare_fast_state": state_ratio(fast), "auto_over_bare_slow_state": state_ratio(slow),
            "bare_epochs_images_per_second_and_cpu_idle_fraction": sorted(idle_by_rate)}


def op_profile(args: dict) -> dict:
    """Milliseconds per training step by op type (TensorFlow profiler, compute threads summed), the seed model at
    batch 128 in float32 and in mixed_bfloat16, on in-memory batches: how much of the step bf16 speeds up."""
    import collections
    import glob

    import keras
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from bench.bare_keras import basic_cnn, load

    x, y = load("train", 6400)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(128, drop_remainder=True).cache().repeat()
    steps = args.get("steps", 20)
    result = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        model = basic_cnn()
        keras.mixed_precision.set_global_policy("float32")
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                      metrics=[keras.metrics.SparseCategoricalAccuracy()])
        model.fit(data, steps_per_epoch=5, epochs=1, verbose=0)  # trace and warm up
        iterator = iter(data)
        with tempfile.TemporaryDirectory() as logdir:
            tf.profiler.experimental.start(logdir)
            started = time.perf_counter()
            for _ in range(steps):
                logs = model.train_function(iterator)
            float(logs["loss"])
            wall = (time.perf_counter() - started) / steps * 1000
            tf.profiler.experimental.stop()
            space = xplane_pb2.XSpace()
            space.ParseFromString(open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[-1], "rb").read())
        by_op: collections.Counter = collections.Counter()
        for plane in space.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):
                    continue
                busy_until = -1  # count top-level ops only: an op's own ParallelFor is nested inside it
                for event in sorted(line.events, key=lambda e: e.offset_ps):
                    name = plane.event_metadata[event.metadata_id].name.split(":")[-1]
                    if name == "Process" or event.offset_ps < busy_until:  # "Process": the executor's wrapper
                        continue
                    by_op[name] += event.duration_ps / 1e9 / steps
                    busy_until = event.offset_ps + event.duration_ps
        conv = sum(v for k, v in by_op.items() if "Conv2D" in k)
        result[policy] = {"step_ms": wall, "conv_ms": conv, "all_ops_ms": sum(by_op.values()),
                          "top_ops_ms": dict(by_op.most_common(8))}
    f32, bf16 = result["float32"], result["mixed_bfloat16"]
    return {**result, "conv_float32_over_bf16": f32["conv_ms"] / bf16["conv_ms"],
            "other_float32_over_bf16": (f32["all_ops_ms"] - f32["conv_ms"]) / (bf16["all_ops_ms"] - bf16["conv_ms"]),
            "step_float32_over_bf16": f32["step_ms"] / bf16["step_ms"]}


def _cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:9]]


def predict(args: dict) -> dict:
    """The predict stage (Parquet in, Parquet out) against raw model.predict on the same images in memory."""
    import pyarrow.parquet as pq

    from pipeline_config import load_config
    from tasks.data.columns import decode_images
    from tasks.model.published import load_model
    from tasks.serve.predict import predict as run_predict

    cfg = load_config(overrides=[f"artifacts.root={args['root']}"])
    table = pq.read_table(args["input"])
    x = decode_images(table.column("image"), [28, 28, 1], "bench")  # uint8: the model scales its own input
    model = load_model(f"{args['model_uri']}/model.keras")
    model.predict(x[:2048], batch_size=cfg.predict.batch_size, verbose=0)  # warm-up
    stage, raw = [], []
    with tempfile.TemporaryDirectory() as out:
        run_predict(cfg, args["model_uri"], args["input"], f"{out}/warm.parquet", allow_unblessed=True)
        for i in range(args.get("repeats", 3)):
            started = time.perf_counter()
            result = run_predict(cfg, args["model_uri"], args["input"], f"{out}/p{i}.parquet", allow_unblessed=True)
            stage.append(result.rows / (time.perf_counter() - started))
            started = time.perf_counter()
            model.predict(x, batch_size=cfg.predict.batch_size, verbose=0)
            raw.append(len(x) / (time.perf_counter() - started))
        # the same model re-cast to float32 and to the `auto` precision: speed and label agreement
        by_precision = {}
        for precision in ("float32", "auto"):
            cfg.predict.precision = precision
            rates, labels = [], None
            for i in range(args.get("repeats", 3)):
                started = time.perf_counter()
                result = run_predict(cfg, args["model_uri"], args["input"], f"{out}/{precision}{i}.parquet",
                                     allow_unblessed=True)
                rates.append(result.rows / (time.perf_counter() - started))
                labels = pq.read_table(result.output).column("predicted_label").to_numpy()
            by_precision[precision] = (statistics.median(rates), labels)
    agreement = float((by_precision["float32"][1] == by_precision["auto"][1]).mean())
    return {"stage_images_per_second": statistics.median(stage), "raw_images_per_second": statistics.median(raw),
            "rows": len(x), "float32_images_per_second": by_precision["float32"][0],
            "auto_images_per_second": by_precision["auto"][0], "auto_float32_label_agreement": agreement}


def predict_memory(args: dict) -> dict:
    """Peak RSS of one predict-stage run over the given input."""
    from pipeline_config import load_config
    from tasks.serve.predict import predict as run_predict

    cfg = load_config(overrides=[f"artifacts.root={args['root']}"])
    with tempfile.TemporaryDirectory() as out:
        result = run_predict(cfg, args["model_uri"], args["input"], f"{out}/p.parquet", allow_unblessed=True)
    return {"rows": result.rows, "peak_rss_mb": peak_rss_mb()}


WORKERS = {"ingest": ingest, "ingest_scale": ingest_scale, "train": train, "train_pairs": train_pairs,
           "op_profile": op_profile, "predict": predict, "predict_memory": predict_memory}

if __name__ == "__main__":
    name, raw = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    result = WORKERS[name](json.loads(raw))
    sys.stdout.flush()
    print(json.dumps(result))
