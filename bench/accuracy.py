"""Accuracy bench: what the default config reaches on full MNIST and what it costs, against the defaults before
schedules and augmentation existed, the long preset and the bare seed script, side by side in one run.

    python -m bench.accuracy                 # full MNIST, cold `tfpipe run` each (~40 min on 2 cores)
    python -m bench.accuracy --quick         # 6,000 images, 2 epochs: checks the bench itself (~4 min)

Each configuration is one cold `tfpipe run --json` (ingest, train, evaluate, predict, report on Prefect's
temporary server) on its own artifact root; the bare script (bench/bare_keras.py: the seed's arrays -> compile
-> fit, all 60,000 training images, constant Adam 1e-3) runs the default's epoch count and the long preset's. Writes
bench/results/<date>-<host>-accuracy.json; `python -m bench.readme` puts it in the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench.run import REPO, RESULTS, bare_keras, timed
from pipeline_config import DEFAULT_LAYERS, load_config

# The defaults up to 2026-11-25: the seed's dropout (0.5 after every block), constant Adam 1e-3, no augmentation.
SEED_LAYERS = [{**layer, "rate": 0.5} if layer["type"] == "Dropout" else layer for layer in DEFAULT_LAYERS]
PREVIOUS_DEFAULTS = [f"model.layers={json.dumps(SEED_LAYERS)}", "train.lr_schedule.name=constant",
                     "train.lr_schedule.warmup_epochs=0", "train.optimizer.learning_rate=0.001",
                     "data.augment.translation=0", "data.augment.rotation=0", "data.augment.zoom=0"]
LONG_PRESET = REPO / "pipeline_config" / "presets" / "long.yaml"


def flow_run(root: Path, sets: list[str], config: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--json", "--set", f"artifacts.root={root}",
           *[a for s in sets for a in ("--set", s)], *(["--config", str(config)] if config else [])]
    seconds, out = timed(cmd)
    summary = json.loads(out)
    history = json.loads((Path(summary["model"]["uri"]) / "history.json").read_text())
    return {"seconds": seconds, "accuracy": summary["evaluation"]["metrics"]["accuracy"],
            "epochs_trained": len(history["epochs"]), "stop_reason": history.get("stop_reason"),
            "train_seconds": sum(h["wall_seconds"] for h in history["epochs"]), "precision": summary["model"]["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    os.environ.pop("PREFECT_API_URL", None)  # each run on Prefect's temporary server, as `tfpipe run` starts it
    quick = ["data.limit=6000", "train.epochs=2"] if args.quick else []
    epochs = 2 if args.quick else load_config().train.epochs
    long_epochs = epochs if args.quick else load_config(LONG_PRESET).train.epochs
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tfpipe-bench-accuracy-") as work:
        work = Path(work)
        # One Prefect home for all runs, its database created first, so that no run pays for that alone.
        os.environ.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
        timed([sys.executable, "-c", "import flows; from prefect import flow\n@flow\ndef nothing(): pass\nnothing()"])
        runs = {"previous": flow_run(work / "previous", PREVIOUS_DEFAULTS + quick),
                "default": flow_run(work / "default", quick),
                "bare": bare_keras(6000 if args.quick else 60000, epochs),
                "long": flow_run(work / "long", quick, LONG_PRESET),
                "bare_long": bare_keras(6000 if args.quick else 60000, long_epochs)}
    previous, default, bare, long = runs["previous"], runs["default"], runs["bare"], runs["long"]
    figures = [
        figure("test accuracy, default config, whole `tfpipe run`", default["accuracy"] * 100, "%", ">= 99.6",
               default["accuracy"] >= 0.996, epochs=default["epochs_trained"], seconds=default["seconds"]),
        figure("whole `tfpipe run` wall time, default / previous default", default["seconds"] / previous["seconds"],
               "x", "<= 1.1", default["seconds"] <= 1.1 * previous["seconds"], default_s=default["seconds"],
               previous_s=previous["seconds"]),
        figure("test accuracy, previous default (seed dropout, constant Adam 1e-3, no augmentation)", previous["accuracy"] * 100,
               "%", "reported", None, epochs=previous["epochs_trained"]),
        figure("test accuracy, bare seed script, same epochs", bare["test_accuracy"] * 100, "%", "reported", None,
               epochs=epochs, seconds=bare["wall_seconds"]),
        figure("test accuracy, presets/long.yaml", long["accuracy"] * 100, "%", ">= 99.7", long["accuracy"] >= 0.997,
               epochs=long["epochs_trained"], seconds=long["seconds"]),
        figure("test accuracy, bare seed script, the long preset's epochs", runs["bare_long"]["test_accuracy"] * 100,
               "%", "reported", None, epochs=long_epochs, seconds=runs["bare_long"]["wall_seconds"]),
    ]
    if args.quick:
        for f in figures:
            f["ok"], f["target"] = None, f"{f['target']} (full run only)"
    for f in figures:
        print(f"{f['figure']}: {f['value']:.4g}{f['unit']}  target {f['target']}  "
              f"{'' if f['ok'] is None else ('met' if f['ok'] else 'MISSED')}")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "seconds": time.perf_counter() - started, "quick": args.quick, "figures": figures, "raw": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{datetime.date.today().isoformat()}-{socket.gethostname()}-accuracy{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    if not args.quick:
        from bench.readme import update_readme

        update_readme(path, accuracy=True)


def figure(name: str, value: float, unit: str, target: str, ok: bool | None, **details) -> dict:
    return {"figure": name, "value": value, "unit": unit, "target": target, "ok": ok, **details}


if __name__ == "__main__":
    main()
