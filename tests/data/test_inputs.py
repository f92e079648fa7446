"""What a prediction input is, decided once from the path (tasks/data/inputs.py): by content, not by name, for relative
and absolute folders, globs and single files alike; and the one listing of a folder's files relative to it."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_config import load_config
from tasks.data.inputs import input_hash, prediction_input, read_images
from tasks.errors import PipelineError
from tasks.preprocess.image_format import ImageFormat
from tasks.store import storage
from tests.conftest import mnist_arrays


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def incoming(tmp_path):
    """A folder of digits as a phone or a scanner names them, with a text file and a hidden file among them."""
    x, _ = mnist_arrays("test", 4)
    folder = tmp_path / "incoming"
    (folder / "scans").mkdir(parents=True)
    (folder / "a.png").write_bytes(encoded(x[0, ..., 0], "PNG"))
    (folder / "b.jfif").write_bytes(encoded(x[1, ..., 0], "JPEG"))  # a JPEG by another name
    (folder / "scans" / "c").write_bytes(encoded(x[2, ..., 0], "PNG"))  # no extension at all
    (folder / "notes.txt").write_text("scanned on Tuesday")
    (folder / ".thumb.png").write_bytes(encoded(x[3, ..., 0], "PNG"))  # hidden: never read
    return folder


def test_image_files_are_told_by_content_from_a_relative_folder(incoming, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    source = prediction_input(str(tmp_path), "incoming")  # relative, as `tfpipe predict --input incoming/` gives it
    assert source.kind == "images" and source.files == ["a.png", "b.jfif", "notes.txt", "scans/c"]
    cfg = load_config(None, ["predict.batch_size=2"])
    batches = list(read_images(cfg, source, ImageFormat(channels=1), [28, 28, 1]))
    paths = [p for b in batches for p in b.columns["path"].to_pylist()]
    assert paths == ["a.png", "b.jfif", "scans/c"]  # the text file left out, the images whatever their names
    x, _ = mnist_arrays("test", 3)
    images = np.concatenate([b.images for b in batches])
    np.testing.assert_array_equal(images[[0, 2]], x[[0, 2]])  # the PNGs, pixel for pixel
    assert "1 file(s) are not images and were left out (the first: notes.txt)" in caplog.text


def test_a_folder_and_a_glob_of_it_list_the_same_files(incoming, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_folder = prediction_input(str(tmp_path), str(incoming))
    by_glob = prediction_input(str(tmp_path), "incoming/*")  # relative glob: files directly under the folder
    assert by_glob.kind == "images" and by_glob.base == str(incoming)
    assert by_glob.files == ["a.png", "b.jfif", "notes.txt"]
    assert set(by_glob.files) < set(by_folder.files) and storage.glob_under(f"{incoming}/*/*") == (str(incoming),
                                                                                                  ["scans/c"])


def test_parquet_is_told_by_its_bytes_and_globs_of_it_are_read_by_the_local_engine(tmp_path, monkeypatch):
    x, y = mnist_arrays("test", 6)
    table = pa.table({"image": pa.array([row.tobytes() for row in x], pa.binary()), "label": pa.array(y)})
    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 3), tmp_path / "parts" / "p0.parquet")
    pq.write_table(table.slice(3, 3), tmp_path / "parts" / "p1.parquet")
    pq.write_table(table, tmp_path / "export-2026-12-01")  # Parquet with no suffix
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.image_shape=[28, 28]"])
    unnamed = prediction_input(str(tmp_path), "export-2026-12-01")
    assert unnamed.kind == "parquet" and unnamed.files == ["export-2026-12-01"]
    globbed = prediction_input(str(tmp_path), "parts/*.parquet")
    assert globbed.kind == "parquet" and globbed.files == [f"{tmp_path}/parts/p0.parquet", f"{tmp_path}/parts/p1.parquet"]
    images = np.concatenate([b.images for b in read_images(cfg, globbed, ImageFormat(), [28, 28, 1])])
    np.testing.assert_array_equal(images, x)
    assert input_hash(globbed) != input_hash(prediction_input(str(tmp_path), "parts/p0.parquet"))
    assert input_hash(globbed) == input_hash(prediction_input(str(tmp_path), str(tmp_path / "parts")))


def test_nothing_to_predict_on_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match=r"missing does not exist: check the path"):
        prediction_input(str(tmp_path), str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"empty holds no files: check the path"):
        prediction_input(str(tmp_path), str(tmp_path / "empty"))
    with pytest.raises(PipelineError, match=r"empty/\*.parquet matches no file: check the pattern"):
        prediction_input(str(tmp_path), str(tmp_path / "empty" / "*.parquet"))
    (tmp_path / "notes.txt").write_text("no image here")
    one = prediction_input(str(tmp_path), str(tmp_path / "notes.txt"))
    with pytest.raises(PipelineError, match=r"notes.txt is not an image \(no format Pillow knows\): check the file"):
        list(read_images(load_config(None, []), one, ImageFormat(channels=1), [28, 28, 1]))
