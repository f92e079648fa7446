"""The bare Keras baseline, written the seed's way: arrays -> compile -> fit -> evaluate -> predict.

    python -m bench.bare_keras --train-images 54000 --epochs 4 --batch-size 128

Prints one JSON line: per-epoch training images/s, wall time per phase, test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow import keras  # noqa: E402

MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist"


def load(split: str, n: int | None = None):
    table = pq.read_table(MNIST / f"{split}.parquet")
    if n:
        table = table.slice(0, n)
    shape = json.loads(table.schema.metadata[b"image_shape"])
    x = np.frombuffer(table.column("image").combine_chunks().buffers()[1], np.uint8, count=table.num_rows * 784)
    return x.reshape(-1, *shape).astype(np.float32) / 255.0, table.column("label").to_numpy().astype(np.int64)


def basic_cnn(input_shape=(28, 28, 1), num_classes=10):
    inputs = keras.layers.Input(input_shape)
    net = keras.layers.Conv2D(32, (3, 3), padding="SAME")(inputs)
    net = keras.layers.Activation("relu")(net)
    net = keras.layers.Conv2D(32, (3, 3), padding="SAME")(net)
    net = keras.layers.Activation("relu")(net)
    net = keras.layers.MaxPool2D(pool_size=(2, 2))(net)
    net = keras.layers.Activation("relu")(net)
    net = keras.layers.Dropout(0.5)(net)
    net = keras.layers.Conv2D(64, (3, 3), padding="SAME")(net)
    net = keras.layers.Activation("relu")(net)
    net = keras.layers.MaxPool2D(pool_size=(2, 2))(net)
    net = keras.layers.Activation("relu")(net)
    net = keras.layers.Conv2D(128, (3, 3), padding="SAME")(net)
    net = keras.layers.Activation("relu")(net)
    net = keras.layers.MaxPool2D(pool_size=(2, 2))(net)
    net = keras.layers.Activation("relu")(net)
    net = keras.layers.Dropout(0.5)(net)
    net = keras.layers.Flatten()(net)
    net = keras.layers.Dense(512)(net)
    net = keras.layers.Activation("relu")(net)
    net = keras.layers.Dropout(0.5)(net)
    net = keras.layers.Dense(num_classes)(net)
    net = keras.layers.Activation("softmax")(net)
    return keras.Model(inputs=inputs, outputs=net, name="basic_cnn")


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)

    def on_train_begin(self, logs=None):
        self.seconds = []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-images", type=int, default=60000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    started = time.perf_counter()
    keras.utils.set_random_seed(42)
    x_train, y_train = load("train", args.train_images)
    x_test, y_test = load("test", args.test_images)
    loaded = time.perf_counter()

    model = basic_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=[keras.metrics.SparseCategoricalAccuracy()])
    timer = EpochTimer()
    model.fit(x_train, y_train, batch_size=args.batch_size, shuffle=True, epochs=args.epochs, callbacks=[timer], verbose=0)
    trained = time.perf_counter()
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    predictions = model.predict(x_test, batch_size=1024, verbose=0)
    done = time.perf_counter()
    print(json.dumps({
        "epoch_images_per_second": [len(x_train) / s for s in timer.seconds],
        "load_seconds": loaded - started, "fit_seconds": trained - loaded, "evaluate_predict_seconds": done - trained,
        "wall_seconds": done - started, "test_accuracy": float(accuracy),
        "predict_accuracy": float((predictions.argmax(1) == y_test).mean()), "train_images": len(x_train),
        "tensorflow": tf.__version__,
    }))


if __name__ == "__main__":
    main()
