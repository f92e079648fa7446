"""tfpipe tune against KerasTuner's RandomSearch, the same search space, budget and data, side by side in one run.

    python -m bench.tune [--train-images 12000] [--epochs 3] [--trials 8]

Both sides tune the learning rate (log-uniform 1e-4..1e-2, Adam) and the batch size (64, 128, 256) of tfpipe's
default model (the same builder) on the first `--train-images` MNIST training images, 10% of them for
validation, `--epochs` per trial, float32, constant rate, no augmentation, objective val_accuracy. tfpipe runs with
its defaults (TPE, median pruner, 2 trials at once on a Dask LocalCluster) as `tfpipe tune` against a Prefect
server the bench starts; KerasTuner runs `RandomSearch` in one process (what a user of it writes). Each side is
timed as a whole process, from start to its best trial. Then the finished study is run again (target: under 10%
of its first run). Targets: tfpipe no slower than KerasTuner; prints the figures and writes
bench/results/<date>-<host>-tune.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench import REPO, answer_measure, bench_parser, in_fresh_process

RESULTS = REPO / "bench" / "results"
BATCH_SIZES = [64, 128, 256]
PLAIN = {"train.lr_schedule.name": "constant", "train.precision": "float32", "data.augment.translation": 0,
         "data.augment.rotation": 0, "data.augment.zoom": 0, "export.formats": []}


def keras_tuner(args: dict) -> dict:
    """KerasTuner RandomSearch over the same space, on tfpipe's model built by tfpipe's own builder."""
    started = time.perf_counter()
    import keras
    import keras_tuner as kt

    from bench.bare_keras import load
    from pipeline_config import load_config
    from tasks.model.build import build_model

    x, y = load("train", args["images"])
    x = (x * 255.0).round()  # tfpipe's models take pixels 0-255 and scale them themselves
    split = int(len(x) * 0.9)
    cfg = load_config()

    class Model(kt.HyperModel):
        def build(self, hp):
            model = build_model(cfg.model, [28, 28, 1], 10, "sparse_categorical_crossentropy", "float32", seed=42)
            rate = hp.Float("learning_rate", 1e-4, 1e-2, sampling="log")
            model.compile(keras.optimizers.Adam(rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
            return model

        def fit(self, hp, model, *fit_args, **kwargs):
            return model.fit(*fit_args, batch_size=hp.Choice("batch_size", BATCH_SIZES), **kwargs)

    tuner = kt.RandomSearch(Model(), objective="val_accuracy", max_trials=args["trials"], seed=0,
                            directory=args["work"], project_name="bench", overwrite=True)
    tuner.search(x[:split], y[:split], epochs=args["epochs"], validation_data=(x[split:], y[split:]), verbose=0)
    best = tuner.oracle.get_best_trials(1)[0]
    return {"seconds_in_process": time.perf_counter() - started, "best": best.score,
            "best_params": best.hyperparameters.values}


def tfpipe_tune(work: Path, args: argparse.Namespace, env: dict) -> tuple[float, dict]:
    config = work / "tune.yaml"
    config.write_text(yaml.safe_dump({"tune": {"trials": args.trials, "search_space": {
        "train.optimizer.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "train.batch_size": {"choices": BATCH_SIZES}}}}))
    sets = {**PLAIN, "artifacts.root": str(work / "artifacts"), "data.limit": args.train_images,
            "train.epochs": args.epochs, "evaluate.min_accuracy": 0.5}
    cmd = [sys.executable, "-m", "flows.cli", "tune", "--json", "--config", str(config),
           *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"tfpipe tune failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - started, json.loads(proc.stdout)


def prefect_server(work: Path) -> tuple[subprocess.Popen, dict]:
    """A Prefect server for the tfpipe runs (a team's, as it would be), up before any timing starts."""
    from tasks.distributed.cluster import free_port

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, {**env, "PREFECT_API_URL": url}
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.time() > deadline:
            raise SystemExit("the bench's Prefect server did not start")
        time.sleep(0.5)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--train-images", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    if answer_measure(args.measure, {"keras_tuner": keras_tuner}):
        return
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="tfpipe-bench-tune-"))
    server, env = prefect_server(work)
    try:
        begun = time.perf_counter()
        kt = in_fresh_process("bench.tune", "keras_tuner", {"images": args.train_images, "epochs": args.epochs,
                                                             "trials": args.trials, "work": str(work / "kt")})
        kt["seconds"] = time.perf_counter() - begun
        first_seconds, first = tfpipe_tune(work, args, env)
        again_seconds, again = tfpipe_tune(work, args, env)
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    states = [t["state"] for t in first["trials"]]
    figures = {
        "KerasTuner RandomSearch wall / tfpipe tune wall (target >= 1)": kt["seconds"] / first_seconds,
        "tfpipe tune: re-run of the finished study / first run, % (target < 10)": 100 * again_seconds / first_seconds,
        "tfpipe tune: wall, s": first_seconds, "KerasTuner: wall, s": kt["seconds"],
        "tfpipe tune: re-run, s": again_seconds,
        "tfpipe tune: best val_accuracy": first["best_value"], "KerasTuner: best val_accuracy": kt["best"],
        "tfpipe tune: trials pruned": states.count("pruned"),
    }
    for name, value in figures.items():
        print(f"{name:75s} {value:10,.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{datetime.date.today()}-{socket.gethostname()}-tune.json"
    out.write_text(json.dumps({"host": socket.gethostname(), "cpus": os.cpu_count(), "figures": figures,
                               "raw": {"keras_tuner": kt, "tfpipe": {k: first[k] for k in ("best_trial", "best_value",
                                                                                         "trials")},
                                       "args": vars(args)}, "minutes": (time.time() - started) / 60}, indent=2))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
