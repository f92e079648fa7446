"""One preprocessing for ingest and serving: a folder that looks like a phone's and a camera's (every EXIF
orientation, progressive and CMYK JPEGs, 16-bit PNGs of different ranges, LA, palette with transparency, 1-bit,
24 and 48 MP photos, a decompression bomb) is ingested, and the SavedModel's serving graph, loaded in a process
that imports TensorFlow alone, as a server runs it, feeds the model the very pixels ingest cached for each file."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tasks.data.ingest import ingest
from tasks.data.reader import make_dataset
from tests.conftest import make_config, photo
from tests.data.test_images import bomb_png

TF_ONLY_SERVER = """
import json, sys
import numpy as np
import tensorflow as tf
saved_model, out, *files = sys.argv[1:]
preprocess = tf.saved_model.load(saved_model).signatures["preprocess_bytes"]
served, refused = [], {}
for path in files:
    try:
        served.append(preprocess(image_bytes=tf.constant([open(path, "rb").read()]))["images"].numpy()[0])
    except tf.errors.InvalidArgumentError as exc:
        refused[path] = exc.message
np.save(out, np.stack(served))
imported = sorted({m.split(".")[0] for m in sys.modules} & {"tasks", "pipeline_config", "flows"})
print(json.dumps({"refused": refused, "imported": imported}))
"""


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def without_adobe_marker(jpeg: bytes) -> bytes:
    """A CMYK JPEG as some scanners write it: no APP14 "Adobe" segment, so its inks are not inverted."""
    at = jpeg.index(b"\xff\xee")
    return jpeg[:at] + jpeg[at + 2 + int.from_bytes(jpeg[at + 2: at + 4], "big"):]


def phone_and_camera(root) -> None:
    """test/<class>/ holds the corpus (the test split keeps path order: the cached records follow the files);
    train/<class>/ a few plain photos."""
    rng = np.random.default_rng(11)
    colour = Image.fromarray(photo(rng, 90, 120, 0))
    files = {}
    for orientation in range(1, 9):
        exif = colour.getexif()
        exif[0x0112] = orientation
        files[f"orientation-{orientation}.jpg"] = encoded(colour, "JPEG", exif=exif.tobytes(), quality=92)
    files["progressive.jpg"] = encoded(colour, "JPEG", progressive=True)
    files["cmyk-adobe.jpg"] = encoded(colour.convert("CMYK"), "JPEG")
    files["cmyk-plain.jpg"] = without_adobe_marker(files["cmyk-adobe.jpg"])
    for top in (4095, 65535):  # a 12-bit scan and a full 16-bit one: one rule, by bit depth
        ramp = np.linspace(0, top, 70 * 100).reshape(70, 100).astype(np.uint16)
        files[f"grey16-max{top}.png"] = encoded(Image.fromarray(ramp), "PNG")
    files["la.png"] = encoded(colour.convert("LA"), "PNG")
    files["palette-transparent.png"] = encoded(colour.convert("P"), "PNG", transparency=0)
    files["one-bit.png"] = encoded(colour.convert("1"), "PNG")
    files["photo.webp"] = encoded(colour, "WEBP", quality=90)
    scene = Image.fromarray(photo(rng, 60, 80, 2))  # a camera's photo: smooth, at full size
    files["camera-24mp.jpg"] = encoded(scene.resize((6000, 4000), Image.Resampling.BILINEAR), "JPEG", quality=85)
    files["phone-48mp.jpg"] = encoded(scene.resize((8000, 6000), Image.Resampling.BILINEAR), "JPEG", quality=85)
    files["zz-bomb.png"] = bomb_png(12_000, 12_000)
    for i, (name, data) in enumerate(sorted(files.items())):
        path = root / "test" / ("a" if i % 2 else "b") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for cls in ("a", "b"):
        for i in range(10):
            path = root / "train" / cls / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encoded(Image.fromarray(photo(rng, 60 + i, 80, 1)), "JPEG"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("phone") / "photos"
    phone_and_camera(root)
    return root


@pytest.mark.parametrize("settings", [["data.image_size=[48, 64]", "data.resize=crop", "data.color_mode=rgb"],
                                      ["data.image_size=[40, 40]", "data.resize=pad", "data.color_mode=grayscale",
                                       "data.interpolation=bicubic"]])
def test_serve_bytes_feeds_the_model_what_ingest_cached_for_every_file(corpus, tmp_path, settings):
    import keras

    from tasks.serve.signatures import serving_archive

    cfg = make_config(tmp_path / "artifacts", f"data.source=folder:{corpus}", *settings, "data.on_bad_image=skip",
                      "data.max_bad_fraction=0.5", "data.validation_fraction=0.3")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    manifest = json.loads((tmp_path / "artifacts" / "ingest" / dataset.fingerprint / "manifest.json").read_text())
    bomb = next(str(p.relative_to(corpus)) for p in corpus.rglob("zz-bomb.png"))
    assert [s["path"] for s in manifest["skipped"]] == [bomb]  # refused from its header, not decoded
    assert "declares 12000x12000 pixels, over data.max_image_pixels=120000000" in manifest["skipped"][0]["why"]
    paths = manifest["test_files"]["paths"]
    assert len(paths) == dataset.counts["test"] == 19 and any(p.endswith("/phone-48mp.jpg") for p in paths)
    cached = np.concatenate([images.numpy() for images, _ in make_dataset(dataset, "test", 64)])

    inputs = keras.Input(dataset.image_shape, dtype="uint8")
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(
        keras.layers.Rescaling(1 / 255)(inputs))))
    serving_archive(model, dataset.image_shape, dataset.image_format, ["a", "b"]).write_out(str(tmp_path / "sm"))
    files = [str(corpus / p) for p in [*paths, bomb]]
    done = subprocess.run([sys.executable, "-c", TF_ONLY_SERVER, str(tmp_path / "sm"), str(tmp_path / "served.npy"),
                           *files], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] == []  # TensorFlow alone: no tfpipe code
    assert list(result["refused"]) == [files[-1]]  # the bomb, refused in the graph too
    assert "declares more pixels than the limit of 120000000" in result["refused"][files[-1]]
    served = np.load(tmp_path / "served.npy")
    unequal = [p for p, s, c in zip(paths, served, cached) if not np.array_equal(s, c)]
    assert served.shape == cached.shape and unequal == []
