"""Fine-tuning a MobileNetV3Small in two phases: the train stage against a bare Keras script doing the same, side by
side in one run; and the stage in auto precision against float32.

    python -m bench.transfer [--train-images 6000] [--epochs 2] [--skip-preset]

Both sides train MobileNetV3Small (random weights, no top) on the first `--train-images` MNIST training images
made 32x32 RGB, batch 128: phase 1 the head on the frozen network (Adam 1e-3), phase 2 everything (1e-4),
`--epochs` each. Images/s per phase from the last epoch of the phase (the first also traces the step). Target:
stage / bare >= 0.95 per phase. Then presets/mobilenet_v3_small.yaml as a cold `tfpipe run` on full MNIST: the
test accuracy and minutes its header quotes. Every side runs in a fresh process; prints the figures and writes
bench/results/<date>-<host>-transfer.json.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from bench import REPO, answer_measure, bench_parser, in_fresh_process
from bench.accuracy import flow_run

RESULTS = REPO / "bench" / "results"
PRESET = REPO / "pipeline_config" / "presets" / "mobilenet_v3_small.yaml"
SIZE, BATCH, RATES = 32, 128, (1e-3, 1e-4)


def stage(args: dict) -> dict:
    """tfpipe's train stage, in-process: ingest (resized at ingest), then the two phases."""
    from pipeline_config import load_config
    from tasks.data.ingest import ingest
    from tasks.train.stage import train

    epochs = args["epochs"]
    cfg = load_config(overrides=[
        f"artifacts.root={args['root']}", f"data.limit={args['images']}", f"data.image_size=[{SIZE},{SIZE}]",
        "data.color_mode=rgb", "data.validation_fraction=0.05", f"train.batch_size={BATCH}",
        f"train.precision={args['precision']}", "model.backbone={name: MobileNetV3Small, dropout: 0.2}",
        "train.lr_schedule.name=constant", "data.augment.translation=0", "data.augment.rotation=0",
        "data.augment.zoom=0", "export.formats=[]",
        f"train.phases=[{{epochs: {epochs}, trainable: head, learning_rate: {RATES[0]}}}, "
        f"{{epochs: {epochs}, trainable: all, learning_rate: {RATES[1]}}}]"])
    model = train(cfg, ingest(cfg.data, cfg.artifacts.root))
    history = json.load(open(f"{model.uri}/history.json"))["epochs"]
    return {"phase_images_per_second": [history[epochs - 1]["images_per_second"], history[-1]["images_per_second"]],
            "val_accuracy": history[-1]["val_accuracy"], "precision": model.precision}


def bare(args: dict) -> dict:
    """The Keras transfer-learning guide's two phases, written plainly: arrays in memory, fit per phase."""
    import keras
    import tensorflow as tf

    from bench.bare_keras import load

    x, y = load("train", args["images"])
    x = tf.image.resize(tf.image.grayscale_to_rgb(tf.constant(x)), (SIZE, SIZE)).numpy() * 255.0
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV3Small(input_shape=(SIZE, SIZE, 3), include_top=False, weights=None)
    inputs = keras.Input((SIZE, SIZE, 3))
    features = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Dropout(0.2)(features))
    model = keras.Model(inputs, outputs)

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.rate = len(x) * 0.95 / (time.perf_counter() - self.started)  # the stage's 5% validation apart

    rates = []
    for trainable, rate in zip((False, True), RATES):
        base.trainable = trainable
        model.compile(keras.optimizers.Adam(rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
        timer = Timer()
        model.fit(x, y, batch_size=BATCH, epochs=args["epochs"], validation_split=0.05, callbacks=[timer], verbose=0)
        rates.append(timer.rate)
    return {"phase_images_per_second": rates}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2, help="per phase")
    parser.add_argument("--skip-preset", action="store_true", help="leave out the preset's full run")
    args = parser.parse_args()
    if answer_measure(args.measure, {"stage": stage, "bare": bare}):
        return
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="tfpipe-bench-transfer-"))
    common = {"images": args.train_images, "epochs": args.epochs}
    runs = {"bare float32": in_fresh_process("bench.transfer", "bare", common),
            "stage float32": in_fresh_process("bench.transfer", "stage", {**common, "precision": "float32",
                                                                           "root": str(work / "f32")}),
            "stage auto": in_fresh_process("bench.transfer", "stage", {**common, "precision": "auto",
                                                                        "root": str(work / "auto")})}
    if not args.skip_preset:
        os.environ.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
        runs["preset"] = flow_run(work / "preset", [], PRESET)
    figures = {}
    for phase in (0, 1):
        rate = {name: runs[name]["phase_images_per_second"][phase] for name in ("bare float32", "stage float32",
                                                                                   "stage auto")}
        figures[f"phase {phase + 1}: stage float32 / bare Keras float32, images/s"] = \
            rate["stage float32"] / rate["bare float32"]
        figures[f"phase {phase + 1}: stage auto ({runs['stage auto']['precision']}) / stage float32, images/s"] = \
            rate["stage auto"] / rate["stage float32"]
        figures.update({f"phase {phase + 1}: {name}, images/s": value for name, value in rate.items()})
    if "preset" in runs:
        figures["presets/mobilenet_v3_small.yaml: test accuracy, %"] = runs["preset"]["accuracy"] * 100
        figures["presets/mobilenet_v3_small.yaml: whole tfpipe run, minutes"] = runs["preset"]["seconds"] / 60
    for name, value in figures.items():
        print(f"{name:70s} {value:12,.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{datetime.date.today()}-{socket.gethostname()}-transfer.json"
    out.write_text(json.dumps({"host": socket.gethostname(), "cpus": os.cpu_count(), "figures": figures,
                               "raw": {**runs, **common}, "minutes": (time.time() - started) / 60}, indent=2))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
