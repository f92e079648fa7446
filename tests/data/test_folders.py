"""Folders of real photos: image files of mixed sizes, modes and orientations (made here with Pillow), a few bad
or foreign files among them, read once at ingest into one shape; models that take the raw pixels."""

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.data.ingest import ingest
from tasks.data.reader import decode_batch, make_dataset, shard_paths
from tasks.errors import PipelineError
from tasks.preprocess.decode import decode_image
from tasks.preprocess.image_format import ImageFormat
from tests.conftest import invoke_cli, jpeg_bytes, make_config, photo, save

CLASSES = ("apple", "banana", "cherry")
TINY_TRAINING = ["train.epochs=1", "train.batch_size=16", "train.lr_schedule.name=constant",
                 "data.augment.translation=0", "data.augment.rotation=0", "data.augment.zoom=0"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A class-per-directory folder of 150 images (40 to 900 px, portrait and landscape; L, P, RGBA, CMYK, RGB;
    JPEG, PNG, BMP, GIF, WebP), plus an EXIF-rotated JPEG, a PNG named .jpg, a truncated JPEG, a text file and a
    hidden file."""
    root = tmp_path_factory.mktemp("photos") / "fruit"
    rng = np.random.default_rng(7)
    modes = ["RGB", "L", "P", "RGBA", "CMYK"]
    formats = {"RGB": ["JPEG", "PNG", "BMP", "WEBP"], "L": ["PNG", "JPEG"], "P": ["GIF", "PNG"], "RGBA": ["PNG", "WEBP"],
               "CMYK": ["JPEG"]}
    for hue, cls in enumerate(CLASSES):
        for i in range(50):
            height, width = (int(v) for v in rng.integers(40, 900, 2))
            if i < 40:  # most of them small: the suite stays fast
                height, width = height // 6 + 40, width // 6 + 40
            mode = modes[i % len(modes)]
            fmt = formats[mode][i % len(formats[mode])]
            image = Image.fromarray(photo(rng, height, width, hue)).convert(mode)
            save(image, root / cls / f"{i:03d}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
    rotated = Image.fromarray(photo(rng, 60, 120, 0))  # stored landscape, shown portrait (orientation 6)
    exif = rotated.getexif()
    exif[0x0112] = 6
    save(rotated, root / "apple" / "rotated.jpg", "JPEG", exif=exif.tobytes())
    save(Image.fromarray(photo(rng, 80, 80, 1)), root / "banana" / "really-a-png.jpg", "PNG")
    (root / "cherry" / "notes.txt").write_text("picked on Tuesday")
    (root / "cherry" / ".DS_Store").write_bytes(b"\0\1\2")
    good = io.BytesIO()
    Image.fromarray(photo(rng, 200, 200, 2)).save(good, format="JPEG")
    (root / "cherry" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    return root


def folder(root, *sets):
    return [f"data.source=folder:{root}", "data.image_size=[48, 64]", *sets]


# ------------------------------------------------------------------------------------------------ ingest

def test_a_folder_of_photos_is_read_once_into_one_shape(photos, tmp_path):
    root = tmp_path / "artifacts"
    cfg = make_config(root, *folder(photos, "data.on_bad_image=skip", "data.max_bad_fraction=0.05"))
    dataset = ingest(cfg.data, cfg.artifacts.root)
    assert dataset.image_shape == [48, 64, 3] and dataset.label_names == list(CLASSES)  # colour: rgb
    assert sum(dataset.counts.values()) == 150 + 2  # the rotated JPEG and the PNG named .jpg are images too
    manifest = json.load(open(f"{dataset.uri}/manifest.json"))
    assert manifest["image_format"] == {"image_size": [48, 64], "resize": "stretch", "interpolation": "bilinear",
                                        "channels": 3, "max_pixels": 120_000_000}
    assert manifest["not_images"] == ["cherry/notes.txt"]  # counted; the hidden file is not even looked at
    assert [s["path"] for s in manifest["skipped"]] == ["cherry/truncated.jpg"]
    assert "cherry/truncated.jpg is not a decodable JPEG image" in manifest["skipped"][0]["why"]
    assert sum(manifest["source_sizes"].values()) == 152 and "512-1023px" in manifest["source_sizes"]
    # the test split: the files whose path hashes below data.test_fraction, and it keeps path order
    assert manifest["test_split"] == "hash of the content below data.test_fraction=0.2"
    assert 0.1 < dataset.counts["test"] / 152 < 0.3
    # the pixels: a file read back from the cache equals the file decoded alone
    images = np.concatenate([b[0].numpy() for b in make_dataset(dataset, "test", 64)])
    test_paths = sorted(p for p in (str(f.relative_to(photos)) for f in photos.rglob("*") if f.is_file())
                        if not p.endswith((".txt", ".DS_Store", "truncated.jpg")))
    again = ingest(cfg.data, cfg.artifacts.root)
    assert again.cache_hit and again.fingerprint == dataset.fingerprint
    first_test = images[0]
    fmt = ImageFormat((48, 64), "stretch", "bilinear", 3)
    candidates = [decode_image((photos / p).read_bytes(), p, fmt) for p in test_paths[:40]]
    assert any(np.array_equal(first_test, c) for c in candidates)


def test_a_bad_image_fails_naming_it_unless_skipped_and_too_many_fail_anyway(photos, tmp_path):
    code, _, err = invoke_cli("ingest", "--set", f"artifacts.root={tmp_path / 'a'}",
                              *[a for s in folder(photos) for a in ("--set", s)])
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"tfpipe: error: {photos}/cherry/truncated.jpg is not a decodable JPEG image (")
    assert lines[0].endswith("(data.on_bad_image=skip leaves bad images out)")
    assert not (tmp_path / "a" / "ingest").exists()
    code, _, err = invoke_cli("ingest", "--set", f"artifacts.root={tmp_path / 'b'}", "--set", "data.on_bad_image=skip",
                              "--set", "data.max_bad_fraction=0.001", *[a for s in folder(photos) for a in ("--set", s)])
    assert code == 1 and "1 of " in err and "more than data.max_bad_fraction=0.001" in err


def test_images_of_many_sizes_without_a_target_size_fail_in_one_line(photos, tmp_path):
    code, _, err = invoke_cli("ingest", "--set", f"artifacts.root={tmp_path}", "--set", f"data.source=folder:{photos}",
                              "--set", "data.on_bad_image=skip", "--set", "data.max_bad_fraction=0.05")
    assert code == 1 and "set data.image_size (and data.color_mode) to make the images one shape" in err


def test_labels_from_a_csv_file_and_class_names_fix_the_order(photos, tmp_path):
    named = {cls: sorted(p.name for p in (photos / cls).iterdir() if p.name[0].isdigit()) for cls in CLASSES}
    rows = [(f"apple/{n}", "sweet", "train") for n in named["apple"]] + \
           [(f"banana/{n}", "sour", "train") for n in named["banana"]] + \
           [(f"cherry/{named['cherry'][0]}", "sour", "test"), (f"cherry/{named['cherry'][1]}", "sweet", "test")]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\n" + "".join(f"{p},{l},{s}\n" for p, l, s in rows))
    cfg = make_config(tmp_path / "a", *folder(photos, f"data.labels_file={labels}", "data.class_names=[sweet, sour]"))
    dataset = ingest(cfg.data, cfg.artifacts.root)
    assert dataset.label_names == ["sweet", "sour"] and dataset.counts["test"] == 2
    assert dataset.counts["train"] + dataset.counts["validation"] == 100
    test_labels = np.concatenate([b[1].numpy() for b in make_dataset(dataset, "test", 8)])
    assert test_labels.tolist() == [1, 0]  # the first cherry sour, the second sweet: path order, class_names' indices
    labels.write_text("path,label\napple/404.jpg,sweet\n")
    with pytest.raises(PipelineError, match=r"names 1 file\(s\) the folder does not hold \(first: apple/404.jpg\)"):
        ingest(make_config(tmp_path / "b", *folder(photos, f"data.labels_file={labels}")).data, str(tmp_path / "b"))


def test_train_and_test_directories_grayscale_and_png_records(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "split"
    for split, count in (("train", 12), ("test", 4)):
        for hue, cls in enumerate(("a", "b")):
            for i in range(count):
                save(Image.fromarray(photo(rng, 30 + i, 50, hue)), root / split / cls / f"{i}.png", "PNG")
    sets = [f"data.source=folder:{root}", "data.image_size=[24, 24]", "data.color_mode=grayscale", "data.resize=pad"]
    raw = ingest(make_config(tmp_path / "raw", *sets).data, str(tmp_path / "raw"))
    png = ingest(make_config(tmp_path / "png", *sets, "data.cache_encoding=png").data, str(tmp_path / "png"))
    assert raw.counts["test"] == 8 and raw.image_shape == [24, 24, 1] and png.encoding == "png"
    for split in ("train", "validation", "test"):
        a = np.concatenate([b[0].numpy() for b in make_dataset(raw, split, 64)])
        b = np.concatenate([b[0].numpy() for b in make_dataset(png, split, 64)])
        np.testing.assert_array_equal(a, b)  # PNG records hold the same pixels, smaller
    raw_records = next(iter(__import__("tensorflow").data.TFRecordDataset(shard_paths(png, "test")).batch(100)))
    assert decode_batch(raw_records, png.image_shape, "png")[0].shape[1:] == (24, 24, 1)


def test_a_folder_in_a_bucket_gives_the_same_records(photos, s3, tmp_path):
    from s3fs import S3FileSystem

    bucket = S3FileSystem()
    subset = [p for p in photos.rglob("*") if p.is_file() and p.parent.name != "cherry" and p.name < "010"]
    for path in subset:
        bucket.put_file(str(path), f"tfp/photos/{path.relative_to(photos)}")
    local = tmp_path / "local"
    for path in subset:
        (local / path.relative_to(photos)).parent.mkdir(parents=True, exist_ok=True)
        (local / path.relative_to(photos)).write_bytes(path.read_bytes())
    from tasks.data.inputs import prediction_input

    listed = prediction_input(str(tmp_path), "s3://tfp/photos")  # a bucket prefix of images, as a prediction input
    assert listed.kind == "images" and listed.base == "s3://tfp/photos"
    assert listed.files == sorted(str(p.relative_to(photos)) for p in subset)  # every file: decoding tells images
    in_bucket = ingest(make_config(tmp_path / "a", *folder("s3://tfp/photos", "data.validation_fraction=0.3")).data,
                       str(tmp_path / "a"))
    on_disk = ingest(make_config(tmp_path / "b", *folder(local, "data.validation_fraction=0.3")).data, str(tmp_path / "b"))
    assert in_bucket.counts == on_disk.counts and in_bucket.label_names == ["apple", "banana"]
    shas = [json.load(open(f"{d.uri}/manifest.json"))["splits"] for d in (in_bucket, on_disk)]
    assert [[s["sha256"] for s in split["shards"]] for split in shas[0].values()] == \
        [[s["sha256"] for s in split["shards"]] for split in shas[1].values()]


# ------------------------------------------------------------------------------------------------ the pipeline

def test_tfpipe_run_on_a_folder_and_predictions_from_a_folder_of_files(photos, prefect_server, tmp_path):
    """The whole flow on a folder source; then the champion scores a folder of image files of any size, keyed by
    path, resized as its dataset was: the same probabilities as the model on the cache's pixels."""
    root = tmp_path / "artifacts"
    sets = folder(photos, "data.on_bad_image=skip", "data.max_bad_fraction=0.05", "evaluate.min_accuracy=0",
                  *TINY_TRAINING)
    code, out, err = invoke_cli("run", "--set", f"artifacts.root={root}", *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    assert "gate: BLESSED" in out and "predictions: " in out
    # the validate stage's report counts the photos' sizes before resizing, as ingest saw them
    ingested = json.load(open(next((root / "ingest").glob("*/manifest.json"))))
    validation = json.load(open(next((root / "validate").glob("*/validation.json"))))
    assert validation["source_sizes"] == ingested["source_sizes"] and sum(validation["source_sizes"].values()) == 152
    incoming = tmp_path / "incoming"
    names = [f"apple/{sorted(p.name for p in (photos / 'apple').iterdir())[3]}", "banana/000.jpg",
             "banana/really-a-png.jpg"]
    for name in names:
        (incoming / name).parent.mkdir(parents=True, exist_ok=True)
        (incoming / name).write_bytes((photos / name).read_bytes())
    output = tmp_path / "scored.parquet"
    code, out, err = invoke_cli("predict", "--set", f"artifacts.root={root}", "--input", str(incoming),
                                "--output", str(output), "--json")
    assert code == 0, err
    table = pq.read_table(output)
    assert table.column("path").to_pylist() == names
    from tasks.model.published import load_model
    from tasks.registry.models import resolve_model

    uri, manifest = resolve_model(str(root), "champion")
    fmt = ImageFormat.from_settings(manifest["image_format"])
    pixels = np.stack([decode_image((incoming / p).read_bytes(), p, fmt) for p in table.column("path").to_pylist()])
    expected = load_model(f"{uri}/model.keras").predict(pixels, verbose=0)
    np.testing.assert_allclose(np.array(table.column("probabilities").to_pylist()), expected, atol=1e-5)
    # a plain Keras process, no tfpipe: Pillow's pixels as they are (uint8, not scaled) into the published model
    script = f"""
import json, sys, numpy as np, keras
from PIL import Image, ImageOps
model = keras.saving.load_model("{uri}/model.keras", compile=False, safe_mode=True)
assert model.inputs[0].dtype == "uint8", model.inputs[0].dtype
pixels = np.stack([np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB").resize((64, 48))) for p in sys.argv[1:]])
print(json.dumps(model.predict(pixels, verbose=0).tolist()))
"""
    proc = subprocess.run([sys.executable, "-c", script, *[str(incoming / n) for n in names]], capture_output=True,
                          text=True, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (plain.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(plain, expected, atol=0.05)  # Pillow's plain resize vs ingest's JPEG draft decode
    # the on-demand flow, on a glob of the files this time
    from flows.prediction import batch_prediction

    artifact = batch_prediction(model="champion", input=f"{incoming}/*/*.jpg", output=str(tmp_path / "flow.parquet"),
                                overrides={"artifacts.root": str(root)})
    jpgs = [n for n in names if n.endswith(".jpg")]
    assert artifact.rows == len(jpgs) and pq.read_table(artifact.output).column("path").to_pylist() == jpgs
    from tasks.data.inputs import prediction_input
    from tasks.serve.parts import input_files

    with pytest.raises(PipelineError, match="holds image files: the Dask engine scores Parquet files and cache "
                                            "splits, a part each; score it with the local engine"):
        input_files(make_config(root), prediction_input(str(root), str(incoming)))


def test_encoded_images_of_many_sizes_in_parquet_are_resized_too(tmp_path):
    rng = np.random.default_rng(5)
    for split, count in (("train", 30), ("test", 10)):
        sizes = rng.integers(20, 90, (count, 2))
        images = pa.array([jpeg_bytes(Image.fromarray(photo(rng, int(h), int(w), i % 3))) for i, (h, w) in enumerate(sizes)])
        pq.write_table(pa.table({"image": images, "label": pa.array(np.arange(count) % 3)}), tmp_path / f"{split}.parquet")
    cfg = make_config(tmp_path / "art", f"data.source=parquet:{tmp_path}", "data.image_size=[32, 32]", "data.resize=crop")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    assert dataset.image_shape == [32, 32, 3] and dataset.counts["test"] == 10
