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
    import numpy as np
    import tensorflow as tf

    from tasks.ingest import ingest as run_ingest
    from tasks.ingest import load_source
    from tasks.reader import make_dataset

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
    x, y = load_source(cfg.data).splits["train"]
    x = x[: dataset.counts["train"]].astype(np.float32) / 255.0  # the seed normalises the arrays up front
    y = y[: dataset.counts["train"]]

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


def train(args: dict) -> dict:
    """The train stage on the cache; images/s from history.json (epochs after the first, median)."""
    root = args["root"]
    overrides = args.get("overrides", [])
    cfg = _config(root, *overrides)
    from tasks.devices import configure_devices

    configure_devices(cfg.train)
    from tasks.ingest import ingest as run_ingest
    from tasks.train import train as run_train

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
    machine: per round, the stage in float32, the bare script (float32), the stage in `auto` precision. Rates are
    the last epoch's images/s (the first pays for tracing); ratios are taken within a round."""
    import keras

    from bench.bare_keras import EpochTimer, basic_cnn, load
    from tasks.ingest import ingest as run_ingest
    from tasks.train import train as run_train

    root, limit, epochs = args["root"], args["limit"], args["epochs"]
    dataset = run_ingest(_config(root, f"data.limit={limit}").data, root)
    n = dataset.counts["train"]
    x, y = load("train", n)
    rounds = []
    for r in range(args["rounds"]):
        rates = {}
        for kind in ("float32", "bare", "auto"):
            if kind == "bare":
                keras.utils.set_random_seed(r)
                model = basic_cnn()
                model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                              metrics=[keras.metrics.SparseCategoricalAccuracy()])
                timer = EpochTimer()
                model.fit(x, y, batch_size=128, shuffle=True, epochs=epochs, callbacks=[timer], verbose=0)
                rates[kind] = n / timer.seconds[-1]
            else:
                cfg = _config(root, f"data.limit={limit}", f"train.epochs={epochs}", f"train.precision={kind}",
                              f"train.seed={r}")
                model_artifact = run_train(cfg, dataset)
                history = json.load(open(f"{model_artifact.uri}/history.json"))["epochs"]
                rates[kind] = history[-1]["images_per_second"]
                rates[f"{kind}_precision"] = model_artifact.precision
        rounds.append(rates)
    return {"rounds": rounds, "train_images": n,
            "float32_over_bare": statistics.median(r["float32"] / r["bare"] for r in rounds),
            "auto_over_bare": statistics.median(r["auto"] / r["bare"] for r in rounds),
            "float32": statistics.median(r["float32"] for r in rounds), "bare": statistics.median(r["bare"] for r in rounds),
            "auto": statistics.median(r["auto"] for r in rounds), "auto_precision": rounds[-1]["auto_precision"]}


def predict(args: dict) -> dict:
    """The predict stage (Parquet in, Parquet out) against raw model.predict on the same images in memory."""
    import numpy as np

    from pipeline_config import load_config
    from tasks.images import decode_images
    from tasks.predict import predict as run_predict
    from tasks.train import load_model

    import pyarrow.parquet as pq

    cfg = load_config(overrides=[f"artifacts.root={args['root']}"])
    table = pq.read_table(args["input"])
    x = decode_images(table.column("image"), [28, 28, 1], "bench").astype(np.float32) / 255.0
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
    from tasks.predict import predict as run_predict

    cfg = load_config(overrides=[f"artifacts.root={args['root']}"])
    with tempfile.TemporaryDirectory() as out:
        result = run_predict(cfg, args["model_uri"], args["input"], f"{out}/p.parquet", allow_unblessed=True)
    return {"rows": result.rows, "peak_rss_mb": peak_rss_mb()}


WORKERS = {"ingest": ingest, "train": train, "train_pairs": train_pairs, "predict": predict,
           "predict_memory": predict_memory}

if __name__ == "__main__":
    name, raw = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    result = WORKERS[name](json.loads(raw))
    sys.stdout.flush()
    print(json.dumps(result))
