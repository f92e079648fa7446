"""A folder of photos: tfpipe's one-time ingest against Keras' image_dataset_from_directory, side by side in one run.

    python -m bench.folders [--images 5000]

Makes `--images` photo-like JPEGs (160 to 640 px a side, RGB, 5 classes) and resizes them to 160x160:
- ingest (decode, resize, write the cache and its statistics) against one full pass of
  `keras.utils.image_dataset_from_directory` over the same folder (which decodes and resizes every file on every
  pass): images/s, target >= 1.0x;
- one training epoch's input read from the cache (shuffled, batched) against one epoch of
  image_dataset_from_directory: images/s, target >= 3x;
- the cache's bytes per image and its reader's images/s for each `data.cache_encoding` (raw, png, jpeg);
- the one preprocessing alone (tasks/preprocess/decode.py `decode_many`, every core): images/s;
- ingest's peak RSS with the whole folder against a tenth of it (x10 / x1), target <= 1.3;
- a folder of `--cameras` 24 MP JPEGs (6000 x 4000) made 224x224: ingest against one Keras pass, images/s, target
  >= 3x (the decoder's DCT scaling reads an eighth of each side).
Every side runs in a fresh process. Prints the figures and writes bench/results/<date>-<host>-folders.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import in_fresh_process

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SIZE = 160


def make_cameras(root: Path, images: int) -> None:
    """24 MP JPEGs as a camera writes them: a scene with a sensor's grain (4 to 9 MB each, quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    for i in range(images):
        small = np.stack([120 + 90 * np.sin(np.arange(80)[None] / (5 + c + i % 3) + rng.random())
                          * np.cos(np.arange(60)[:, None] / (6 + c)) for c in range(3)], -1)
        scene = np.asarray(Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize(
            (6000, 4000), Image.Resampling.BILINEAR), np.int16)
        grain = rng.integers(-6, 7, scene.shape[:2], dtype=np.int16)[..., None]
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((scene + grain).clip(0, 255).astype(np.uint8)).save(root / f"class{i % 2}" / f"{i:04d}.jpg",
                                                                           quality=90)


def make_folder(root: Path, images: int, seed: int = 0) -> None:
    """Photo-like JPEGs: smooth colour fields with texture, 160 to 640 px a side, portrait and landscape."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        cls = f"class{i % 5}"
        height, width = (int(v) for v in rng.integers(160, 641, 2))
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([120 + 90 * np.sin(x / (30 + 10 * c) + i) * np.cos(y / (40 + 7 * c)) for c in range(3)], -1)
        pixels[..., i % 5 % 3] += 40
        pixels += rng.normal(0, 10, pixels.shape)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / cls / f"{i:06d}.jpg", quality=90)


def measure(name: str, args: dict) -> dict:
    """One side, in a fresh process: its figures and its peak RSS."""
    return in_fresh_process("bench.folders", name, args)


def side(name: str, args: dict) -> dict:
    """The body of `measure` (run in the fresh process)."""
    import tensorflow as tf

    tf.constant(0)  # TensorFlow's one-time start-up is no side's work
    if name == "ingest":
        from pipeline_config import load_config
        from tasks.data.ingest import ingest

        size = args.get("size", SIZE)
        cfg = load_config(overrides=[f"artifacts.root={args['root']}", f"data.source=folder:{args['folder']}",
                                     f"data.image_size=[{size}, {size}]", "data.color_mode=rgb",
                                     f"data.cache_encoding={args.get('encoding', 'raw')}",
                                     "data.validation_fraction=0.2"])
        started = time.perf_counter()
        dataset = ingest(cfg.data, cfg.artifacts.root)
        seconds = time.perf_counter() - started
        stored = sum(os.path.getsize(os.path.join(dataset.uri, name)) for names in dataset.shards.values()
                     for name in names)
        return {"seconds": seconds, "images": sum(dataset.counts.values()), "uri": dataset.uri,
                "bytes_per_image": stored / sum(dataset.counts.values())}
    if name == "read_cache":
        from tasks.data.reader import make_dataset
        from tasks.store.publish import read_manifest
        from tasks.store.refs import dataset_artifact

        dataset = dataset_artifact(args["uri"], read_manifest(args["uri"]), cache_hit=True)
        data = make_dataset(dataset, "train", 64, shuffle_buffer=10_000, seed=1)
        for _ in data.take(2):  # the pipeline's start-up and first shuffle-buffer fill, outside the epoch
            pass
        started, images = time.perf_counter(), 0
        for batch, _ in make_dataset(dataset, "train", 64, shuffle_buffer=10_000, seed=2):
            images += int(batch.shape[0])
        return {"seconds": time.perf_counter() - started, "images": images}
    if name == "keras_folder":
        import keras

        size = args.get("size", SIZE)
        data = keras.utils.image_dataset_from_directory(args["folder"], image_size=(size, size), batch_size=64,
                                                        seed=1, verbose=False)
        started, images = time.perf_counter(), 0
        for batch, _ in data:
            images += int(batch.shape[0])
        return {"seconds": time.perf_counter() - started, "images": images}
    if name == "decode":
        from tasks.preprocess.decode import decode_many
        from tasks.preprocess.image_format import ImageFormat

        files = sorted(str(p) for p in Path(args["folder"]).rglob("*.jpg"))
        fmt = ImageFormat((SIZE, SIZE), "stretch", "bilinear", 3)
        decode_many([open(files[0], "rb").read()], files[:1], fmt)  # its graph traced: once per process
        started = time.perf_counter()
        for start in range(0, len(files), 512):
            chunk = files[start: start + 512]
            decode_many([open(f, "rb").read() for f in chunk], chunk, fmt)
        return {"seconds": time.perf_counter() - started, "images": len(files)}
    raise SystemExit(f"unknown side {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--cameras", type=int, default=40)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = side(args.measure[0], json.loads(args.measure[1]))
        print(json.dumps({**result, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="tfpipe-bench-folders-"))
    whole, tenth = work / "photos", work / "photos-tenth"
    make_folder(whole, args.images)
    make_folder(tenth, max(50, args.images // 10), seed=1)
    folder_mb = sum(p.stat().st_size for p in whole.rglob("*.jpg")) / 1e6
    ingested = {e: measure("ingest", {"root": str(work / f"root-{e}"), "folder": str(whole), "encoding": e})
                for e in ("raw", "png", "jpeg")}
    keras_pass = measure("keras_folder", {"folder": str(whole)})
    reads = {e: measure("read_cache", {"uri": ingested[e]["uri"]}) for e in ingested}
    decoding = measure("decode", {"folder": str(whole)})
    small = measure("ingest", {"root": str(work / "root-tenth"), "folder": str(tenth)})
    cameras = work / "cameras"
    make_cameras(cameras, args.cameras)
    camera_ingest = measure("ingest", {"root": str(work / "root-cameras"), "folder": str(cameras), "size": 224})
    camera_keras = measure("keras_folder", {"folder": str(cameras), "size": 224})

    def rate(m: dict) -> float:
        return m["images"] / m["seconds"]

    figures = {
        "ingest / one pass of image_dataset_from_directory, images/s": rate(ingested["raw"]) / rate(keras_pass),
        "epoch from the cache / an epoch of image_dataset_from_directory, images/s": rate(reads["raw"]) / rate(keras_pass),
        **{f"cache bytes per image, {e}": ingested[e]["bytes_per_image"] for e in ingested},
        **{f"reader images/s, {e} records": rate(reads[e]) for e in reads},
        "the one preprocessing alone (decode_many), images/s": rate(decoding),
        "ingest peak RSS, x10 folder / x1 folder": ingested["raw"]["peak_rss_mb"] / small["peak_rss_mb"],
        "24 MP JPEGs to 224x224: ingest / one Keras pass, images/s": rate(camera_ingest) / rate(camera_keras),
        "24 MP JPEGs: ingest peak RSS MB": camera_ingest["peak_rss_mb"],
    }
    raw = {"images": args.images, "folder_mb": folder_mb, "ingest": ingested, "keras_pass": keras_pass,
           "reads": reads, "decoding": decoding, "ingest_tenth": small, "cameras": args.cameras,
           "camera_ingest": camera_ingest, "camera_keras": camera_keras}
    for name, value in figures.items():
        print(f"{name:80s} {value:12,.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{datetime.date.today()}-{socket.gethostname()}-folders.json"
    out.write_text(json.dumps({"host": socket.gethostname(), "cpus": os.cpu_count(), "figures": figures, "raw": raw,
                               "minutes": (time.time() - started) / 60}, indent=2))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
