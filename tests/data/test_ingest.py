import hashlib
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tasks.data.ingest import ingest
from tasks.data.reader import decode_batch, make_dataset, shard_paths
from tests.conftest import artifacts_under, invoke_cli, make_config, mnist_arrays, write_parquet_source


def read_split(dataset, split):
    """Every record of a split through TensorFlow: (images, labels) in stored order."""
    raw = tf.data.TFRecordDataset(shard_paths(dataset, split)).batch(100000)
    images, labels = [], []
    for serialized in raw:
        x, y = decode_batch(serialized, dataset.image_shape)
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def sorted_rows(x, y):
    keys = [xi.tobytes() + bytes([yi]) for xi, yi in zip(x.reshape(len(x), -1), y)]
    return sorted(keys)


def splitmix64(z: int) -> int:
    """splitmix64's finalizer, written out here on Python integers (the stage's is vectorised NumPy)."""
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def validation_rows(count: int, seed: int, fraction: float) -> list[int]:
    """The rows the README's rule sends to validation: a seeded hash of the row index below the fraction."""
    offset = splitmix64(seed)
    return [i for i in range(count) if (splitmix64((i + offset) & ((1 << 64) - 1)) >> 11) / 2 ** 53 < fraction]


def test_embedded_mnist_round_trips_record_for_record(root):
    cfg = make_config(root, "data.limit=1000", "data.shards=3")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    counts = dataset.counts
    expected = validation_rows(1000, seed=42, fraction=0.1)
    assert counts["test"] == 1000 and counts["validation"] == len(expected) and counts["train"] == 1000 - len(expected)
    assert dataset.image_shape == [28, 28, 1] and dataset.num_classes == 10
    assert dataset.label_names == [str(i) for i in range(10)]
    assert len(dataset.shards["train"]) == 3
    x_train, y_train = mnist_arrays("train", 1000)
    x_test, y_test = mnist_arrays("test", 1000)
    # the test split keeps source order; train + validation are a shuffled partition of the source train rows
    got_x, got_y = read_split(dataset, "test")
    np.testing.assert_array_equal(got_x, x_test)
    np.testing.assert_array_equal(got_y, y_test)
    tx, ty = read_split(dataset, "train")
    vx, vy = read_split(dataset, "validation")
    assert sorted_rows(np.concatenate([tx, vx]), np.concatenate([ty, vy])) == sorted_rows(x_train, y_train)
    assert sorted_rows(vx, vy) == sorted_rows(x_train[expected], y_train[expected])  # exactly those rows
    manifest = json.load(open(f"{dataset.uri}/manifest.json"))
    assert manifest["splits"]["test"]["class_histogram"] == np.bincount(y_test, minlength=10).tolist()
    for shard in manifest["splits"]["train"]["shards"]:
        assert shard["sha256"] == hashlib.sha256(open(f"{dataset.uri}/{shard['file']}", "rb").read()).hexdigest()
    assert sum(s["count"] for s in manifest["splits"]["train"]["shards"]) == counts["train"]


def test_rerun_is_a_verified_cache_hit_and_corruption_is_caught(root, caplog):
    cfg = make_config(root, "data.limit=300")
    first = ingest(cfg.data, cfg.artifacts.root)
    shard = f"{first.uri}/{first.shards['train'][0]}"
    mtime = tf.io.gfile.stat(shard).mtime_nsec
    with caplog.at_level("INFO", logger="tfpipe"):
        second = ingest(cfg.data, cfg.artifacts.root)
    assert second.cache_hit and not first.cache_hit and second.fingerprint == first.fingerprint
    assert tf.io.gfile.stat(shard).mtime_nsec == mtime  # nothing rewritten
    assert "cache hit" in caplog.text
    with open(shard, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    caplog.clear()
    with caplog.at_level("WARNING", logger="tfpipe"):
        rebuilt = ingest(cfg.data, cfg.artifacts.root)  # derived data: rebuilt from the source, with a warning
    assert "fails its sha256 check: it is derived data, rebuilding it" in caplog.text
    assert not rebuilt.cache_hit and rebuilt.fingerprint == first.fingerprint
    manifest = json.load(open(f"{rebuilt.uri}/manifest.json"))
    stored = {s["file"]: s["sha256"] for s in manifest["splits"]["train"]["shards"]}
    assert hashlib.sha256(open(shard, "rb").read()).hexdigest() == stored[first.shards["train"][0]]
    assert ingest(cfg.data, cfg.artifacts.root).cache_hit


def test_changed_config_or_source_gives_new_fingerprint(root, tmp_path):
    x, y = mnist_arrays("train", 60)
    src = write_parquet_source(tmp_path / "src", (x, y), (x[:20], y[:20]), metadata={"image_shape": "[28, 28, 1]"})
    cfg = make_config(root, f"data.source=parquet:{src}")
    a = ingest(cfg.data, cfg.artifacts.root)
    b = ingest(make_config(root, f"data.source=parquet:{src}", "data.seed=1").data, cfg.artifacts.root)
    # the reader-only shuffle buffer does not change what is written
    c = ingest(make_config(root, f"data.source=parquet:{src}", "data.shuffle_buffer=5").data, cfg.artifacts.root)
    assert a.fingerprint != b.fingerprint and c.fingerprint == a.fingerprint and c.cache_hit
    write_parquet_source(src, (x[:50], y[:50]), (x[:20], y[:20]), metadata={"image_shape": "[28, 28, 1]"})
    d = ingest(cfg.data, cfg.artifacts.root)
    assert d.fingerprint != a.fingerprint and d.counts["train"] + d.counts["validation"] == 50


@pytest.mark.parametrize("image_type", ["fixed", "binary", "list"])
def test_parquet_image_encodings(root, tmp_path, image_type):
    x, y = mnist_arrays("train", 40)
    src = write_parquet_source(tmp_path / "src", (x, y), (x[:10], y[:10]), image_type=image_type)
    cfg = make_config(root, f"data.source=parquet:{src}", "data.image_shape=[28, 28]")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    got_x, got_y = read_split(dataset, "test")
    np.testing.assert_array_equal(got_x, x[:10])
    np.testing.assert_array_equal(got_y, y[:10])
    assert dataset.num_classes == int(y.max()) + 1 and dataset.label_names is None


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_png_huggingface_struct_and_part_directories(root, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (30, 8, 6, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 30)
    src = tmp_path / "hf"
    for split, rows in (("train", slice(0, 20)), ("test", slice(20, 30))):
        (src / split).mkdir(parents=True)
        images = pa.array([{"bytes": png_bytes(im), "path": None} for im in x[rows]],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"img": images, "y": pa.array(y[rows], pa.int32())}).replace_schema_metadata(
            {"label_names": json.dumps(["cat", "dog", "fox"])})
        pq.write_table(table.slice(0, 5), src / split / "part-0.parquet")
        pq.write_table(table.slice(5), src / split / "part-1.parquet")
    cfg = make_config(root, f"data.source=parquet:{src}", "data.image_column=img", "data.label_column=y")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    assert dataset.image_shape == [8, 6, 3] and dataset.label_names == ["cat", "dog", "fox"]
    got_x, got_y = read_split(dataset, "test")
    np.testing.assert_array_equal(got_x, x[20:])
    np.testing.assert_array_equal(got_y, y[20:])


def test_npz_source(root, tmp_path):
    x, y = mnist_arrays("train", 50)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x[:40, :, :, 0], y_train=y[:40], x_test=x[40:, :, :, 0], y_test=y[40:])
    cfg = make_config(root, f"data.source=npz:{path}")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    assert dataset.counts["test"] == 10 and dataset.image_shape == [28, 28, 1]
    np.testing.assert_array_equal(read_split(dataset, "test")[0], x[40:])


def test_tfds_source_with_mock_data(root):
    cfg = make_config(root, "data.source=tfds:mnist")
    with tfds.testing.mock_data(num_examples=40):
        dataset = ingest(cfg.data, cfg.artifacts.root)
    assert dataset.counts["test"] == 40 and dataset.counts["train"] + dataset.counts["validation"] == 40
    assert dataset.image_shape == [28, 28, 1] and dataset.num_classes == 10  # the builder's label names say 10
    assert dataset.label_names == [str(i) for i in range(10)]


def test_reader_batches_raw_pixels_and_one_hot(root):
    """uint8 pixels as the cache holds them (the model scales its own input), labels as the loss wants them."""
    cfg = make_config(root, "data.limit=200")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    images, labels = next(iter(make_dataset(dataset, "train", 32, shuffle_buffer=100, seed=1, label_mode="categorical")))
    assert images.shape == (32, 28, 28, 1) and images.dtype == tf.uint8 and int(tf.reduce_max(images)) == 255
    assert labels.shape == (32, 10) and np.allclose(labels.numpy().sum(axis=1), 1.0)
    total = sum(int(y.shape[0]) for _, y in make_dataset(dataset, "train", 32, shuffle_buffer=100, seed=1))
    assert total == dataset.counts["train"]


def assert_clean_failure(root, *overrides, match):
    """The CLI fails with exit 1 and one line naming the problem, no traceback, and leaves the root as it found
    it: a root that did not exist still does not (no `.leases/` either), one that did holds what it held."""
    before = sorted(root.rglob("*")) if root.exists() else None
    code, out, err = invoke_cli("ingest", "--set", f"artifacts.root={root}", *[a for o in overrides for a in ("--set", o)])
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfpipe: "), err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err + out
    assert artifacts_under(root) == []
    assert (sorted(root.rglob("*")) if root.exists() else None) == before


def test_bad_input_missing_path(root, tmp_path):
    assert_clean_failure(root, f"data.source=parquet:{tmp_path}/nope", match="does not exist")
    assert_clean_failure(root, f"data.source=npz:{tmp_path}/nope.npz", match="does not exist")


def test_bad_input_parquet_without_columns(root, tmp_path):
    x, y = mnist_arrays("train", 20)
    src = write_parquet_source(tmp_path / "src", (x, y), (x, y))
    assert_clean_failure(root, f"data.source=parquet:{src}", "data.image_column=pixels", match="no column 'pixels'")


def test_bad_input_image_bytes_do_not_match_shape(root, tmp_path):
    x, y = mnist_arrays("train", 20)
    src = write_parquet_source(tmp_path / "src", (x, y), (x, y), image_type="binary")
    assert_clean_failure(root, f"data.source=parquet:{src}", "data.image_shape=[28, 27]", match="784 values but the image shape")
    ragged = tmp_path / "ragged"
    ragged.mkdir()
    for split in ("train", "test"):
        pq.write_table(pa.table({"image": pa.array([b"\x00" * 784, b"\x00" * 700]), "label": pa.array([1, 2])}),
                       ragged / f"{split}.parquet")
    assert_clean_failure(root, f"data.source=parquet:{ragged}", match="row 1 has 700 image bytes")


def test_bad_input_labels(root, tmp_path):
    x, y = mnist_arrays("train", 20)
    for name, labels, match in (("neg", pa.array([-1] + [0] * 19), "negative label -1"),
                                ("float", pa.array([0.5] * 20), "expected integers")):
        src = tmp_path / name
        src.mkdir()
        for split in ("train", "test"):
            pq.write_table(pa.table({"image": pa.array([r.tobytes() for r in x.reshape(20, -1)], pa.binary(784)),
                                     "label": labels}), src / f"{split}.parquet")
        assert_clean_failure(root, f"data.source=parquet:{src}", match=match)


def test_bad_input_empty_split(root, tmp_path):
    x, y = mnist_arrays("train", 20)
    src = write_parquet_source(tmp_path / "src", (x, y), (x[:0], y[:0]))
    assert_clean_failure(root, f"data.source=parquet:{src}", match="test split is empty")


def test_bad_input_npz_length_mismatch_and_object_arrays(root, tmp_path):
    x, y = mnist_arrays("train", 20)
    short = tmp_path / "short.npz"
    np.savez(short, x_train=x, y_train=y[:10], x_test=x, y_test=y)
    assert_clean_failure(root, f"data.source=npz:{short}", match="20 images but 10 labels")
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_train=np.array([x[0], "a"], dtype=object), y_train=y[:2], x_test=x, y_test=y)
    assert_clean_failure(root, f"data.source=npz:{objects}", match="object arrays")


def test_bad_input_tfds_unknown_name_and_offline(root, tmp_path):
    assert_clean_failure(root, "data.source=tfds:no_such_dataset_xyz", match="unknown TFDS dataset 'no_such_dataset_xyz'")
    # mnist exists in TFDS but is not prepared in an empty data dir, and downloads are off (no network here)
    assert_clean_failure(root, "data.source=tfds:mnist", f"data.tfds_data_dir={tmp_path}/tfds",
                         match="TFDS dataset 'mnist' could not be loaded")


def test_cli_ingest_json_prints_dataset_artifact(root):
    code, out, err = invoke_cli("ingest", "--set", f"artifacts.root={root}", "--set", "data.limit=100", "--json")
    assert code == 0, err
    artifact = json.loads(out)
    counts = artifact["counts"]
    assert counts["test"] == 100 and counts["train"] + counts["validation"] == 100 and artifact["cache_hit"] is False
    code, out, _ = invoke_cli("ingest", "--set", f"artifacts.root={root}", "--set", "data.limit=100", "--json")
    assert json.loads(out)["cache_hit"] is True and json.loads(out)["fingerprint"] == artifact["fingerprint"]


def protobuf_example(image: np.ndarray, label: int) -> bytes:
    """The record layout the reader parses, built with the protobuf API."""
    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    })).SerializeToString()


@pytest.mark.parametrize("shape", [(28, 28, 1), (2, 2, 1), (32, 32, 3), (100, 90, 3)])
def test_fast_example_encoder_matches_the_protobuf_api(shape):
    from tasks.data.ingest import ExampleEncoder

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, shape, dtype=np.uint8)
    encoder = ExampleEncoder(image.size)
    for label in (0, 5, 127, 128, 300, 70000, 2**40):
        fast = encoder.encode(image.tobytes(), label)
        reference = protobuf_example(image, label)
        assert len(fast) == len(reference)
        assert tf.train.Example.FromString(fast) == tf.train.Example.FromString(reference)


def test_written_shards_hold_the_protobuf_examples(root):
    """The records ingest actually writes (through write_tfrecord_shards) equal the protobuf API's messages."""
    cfg = make_config(root, "data.limit=50", "data.shards=2")
    dataset = ingest(cfg.data, cfg.artifacts.root)
    x, y = mnist_arrays("test", 50)
    records = [r.numpy() for r in tf.data.TFRecordDataset(shard_paths(dataset, "test"))]
    assert len(records) == 50
    for record, image, label in zip(records, x, y.tolist()):
        assert tf.train.Example.FromString(record) == tf.train.Example.FromString(protobuf_example(image, label))


def many_row_groups(tmp_path, n: int, row_group: int, bad_row: int | None = None):
    """A parquet: source of the first n MNIST train rows (test: 500 rows) in row groups of `row_group` rows."""
    x, y = mnist_arrays("train", n)
    images = [r.tobytes() for r in x.reshape(n, -1)]
    if bad_row is not None:
        images[bad_row] = images[bad_row][:700]
    src = tmp_path / f"src-{n}-{bad_row}"
    src.mkdir()
    meta = {"image_shape": "[28, 28, 1]"}
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(y, pa.int64())})
                   .replace_schema_metadata(meta), src / "train.parquet", row_group_size=row_group)
    pq.write_table(pa.table({"image": pa.array(images[:500], pa.binary()), "label": pa.array(y[:500], pa.int64())})
                   .replace_schema_metadata(meta), src / "test.parquet")
    return src, x, y


def test_streamed_ingest_keeps_every_record_once_with_a_hash_split(root, tmp_path):
    src, x, y = many_row_groups(tmp_path, 20000, row_group=2000)
    sets = [f"data.source=parquet:{src}", "data.ingest_batch_rows=3000", "data.shards=4"]
    dataset = ingest(make_config(root, *sets).data, str(root))
    tx, ty = read_split(dataset, "train")
    vx, vy = read_split(dataset, "validation")
    assert sorted_rows(np.concatenate([tx, vx]), np.concatenate([ty, vy])) == sorted_rows(x, y)  # each once
    assert len(vy) == len(validation_rows(20000, seed=42, fraction=0.1))
    manifest = json.load(open(f"{dataset.uri}/manifest.json"))
    histogram = np.add(manifest["splits"]["train"]["class_histogram"], manifest["splits"]["validation"]["class_histogram"])
    assert histogram.tolist() == np.bincount(y, minlength=10).tolist()
    assert manifest["validation_split"]["method"] == "hash of row index"
    assert manifest["validation_split"]["actual_fraction"] == len(vy) / 20000
    assert manifest["source_hash_method"] == "file size, modification time (ETag in a bucket) and Parquet footer"
    index = {r.tobytes(): i for i, r in enumerate(x.reshape(len(x), -1))}
    for name in dataset.shards["train"]:  # every shard holds a mix of the whole input, start to end
        sx, _ = read_records(f"{dataset.uri}/{name}", dataset.image_shape)
        rows = [index[r.tobytes()] for r in sx.reshape(len(sx), -1)]
        assert len(rows) > 3000 and min(rows) < 100 and max(rows) > 19900
    # deterministic: another root, another batch size, the same bytes
    again = ingest(make_config(tmp_path / "other", *sets[:1], "data.ingest_batch_rows=777", "data.shards=4").data,
                   str(tmp_path / "other"))
    assert again.fingerprint == dataset.fingerprint
    other = json.load(open(f"{again.uri}/manifest.json"))
    assert [s["sha256"] for s in other["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in manifest["splits"]["train"]["shards"]]


def read_records(path: str, shape: list[int]):
    raw = tf.data.TFRecordDataset([path]).batch(100000)
    images, labels = zip(*[decode_batch(s, shape) for s in raw])
    return np.concatenate([i.numpy() for i in images]), np.concatenate([l.numpy() for l in labels])


def test_split_key_hashes_a_column(root, tmp_path):
    x, y = mnist_arrays("train", 300)
    src = write_parquet_source(tmp_path / "src", (x, y), (x[:20], y[:20]), metadata={"image_shape": "[28, 28, 1]"})
    table = pq.read_table(src / "train.parquet")
    pq.write_table(table.append_column("patient", pa.array([f"p{i // 3}" for i in range(300)])), src / "train.parquet")
    dataset = ingest(make_config(root, f"data.source=parquet:{src}", "data.split_key=patient",
                                 "data.validation_fraction=0.3").data, str(root))
    vx, _ = read_split(dataset, "validation")
    rows = {r.tobytes(): i for i, r in enumerate(x.reshape(300, -1))}
    patients = {rows[r.tobytes()] // 3 for r in vx.reshape(len(vx), -1)}
    assert len(vx) == 3 * len(patients)  # a patient's three rows always land in the same split


def test_a_bad_row_in_a_late_row_group_names_its_rows_and_leaves_nothing(root, tmp_path):
    src, _, _ = many_row_groups(tmp_path, 5000, row_group=1000, bad_row=4321)
    assert_clean_failure(root, f"data.source=parquet:{src}", "data.ingest_batch_rows=1000",
                         match=r"train.parquet rows 4000\.\.4999: row 321 has 700 image bytes")


def test_tfds_streams_in_batches(root):
    cfg = make_config(root, "data.source=tfds:mnist", "data.ingest_batch_rows=7")
    with tfds.testing.mock_data(num_examples=50):
        dataset = ingest(cfg.data, cfg.artifacts.root)
    assert dataset.counts["test"] == 50 and dataset.counts["train"] + dataset.counts["validation"] == 50
    assert len(read_split(dataset, "test")[1]) == 50


def test_ingest_memory_is_flat_in_the_size_of_the_data(tmp_path):
    """Peak RSS of a subprocess ingesting 10x the rows stays within 1.3x of 1x (and grows far less than the data)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = """
import resource, sys
from pipeline_config import load_config
from tasks.data.ingest import ingest
import tensorflow  # noqa: F401  (loaded before the baseline)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = load_config(overrides=[f"artifacts.root={sys.argv[2]}", f"data.source=parquet:{sys.argv[1]}", "data.ingest_batch_rows=1000"])
ingest(cfg.data, cfg.artifacts.root)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    peaks = {}
    for n in (6000, 60000):
        x, y = mnist_arrays("train", n)
        src = tmp_path / f"src{n}"
        write_parquet_source(src, (x, y), (x[:100], y[:100]), metadata={"image_shape": "[28, 28, 1]"})
        proc = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / f"root{n}")], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[n] = [int(v) for v in proc.stdout.split()[-2:]]  # KiB: after imports, at the end
    (base1, peak1), (base10, peak10) = peaks[6000], peaks[60000]
    assert peak10 <= 1.3 * peak1, peaks
    data_growth_kib = (60000 - 6000) * 784 / 1024  # what holding the extra images would cost
    assert (peak10 - base10) - (peak1 - base1) < 0.25 * data_growth_kib, peaks
