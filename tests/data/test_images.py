"""Hostile image files: sizes read from the header and checked against data.max_image_pixels before any pixel is
decoded (tasks/preprocess/graph.py)."""

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.data.columns import decode_images
from tasks.errors import PipelineError
from tests.conftest import REPO, invoke_cli


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 8-bit grey pixels; its data is the first 10 MB of zero rows,
    compressed to a few kB (what a decompression bomb looks like on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10_000_000)) + chunk(b"IEND", b"")


def encoded(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def test_the_header_gives_the_size_without_decoding():
    from tasks.preprocess.decode import decode_image
    from tasks.preprocess.graph import KINDS, decode, probe
    from tasks.preprocess.image_format import ImageFormat

    files = [encoded(np.zeros((40, 24 + len(fmt), 3), np.uint8), fmt) for fmt in KINDS]  # sizes none share
    kinds, sizes, orientations = probe(files + [bomb_png(100_000, 90_000), b"no image"])  # nothing decoded
    assert [KINDS[k] for k in kinds.numpy()[:-1]] == [*KINDS, "PNG"] and kinds.numpy()[-1] == -1
    assert sizes.numpy().tolist()[1:] == [[40, 24 + len(fmt)] for fmt in KINDS[1:]] + [[90_000, 100_000], [0, 0]]
    _, jpeg_size = decode(files[0], kinds[0], sizes[0], orientations[0], ImageFormat())  # libjpeg reads a JPEG's
    assert jpeg_size.numpy().tolist() == [40, 28]
    with pytest.raises(PipelineError, match=r"^d is not a decodable PNG image \("):
        decode_image(b"\x89PNG\r\n", "d", ImageFormat())


def test_decompression_bomb_is_refused_from_its_header_fast_and_flat():
    """In a fresh process (its peak memory is its own): 100k x 100k declared, refused before decoding."""
    script = f"""
import json, resource, time, sys
sys.path.insert(0, {str(REPO)!r})
import pyarrow as pa
from tests.data.test_images import bomb_png, png
from tasks.data.columns import decode_images
from tasks.errors import PipelineError
import numpy as np
decode_images(pa.array([png(np.zeros((28, 28), np.uint8))], pa.binary()), None, "warm-up")  # TensorFlow started,
try:  # and its graphs traced, the refusal's too: a cost paid once per process, whatever comes after
    decode_images(pa.array([bomb_png(9_000, 20_000)], pa.binary()), None, "warm-up")
except PipelineError:
    pass
column = pa.array([png(np.zeros((28, 28), np.uint8))] * 3 + [bomb_png(100_000, 100_000)], pa.binary())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    decode_images(column, None, "upload.parquet rows 0..3")
    message = None
except PipelineError as exc:
    message = str(exc)
print(json.dumps({{"message": message, "seconds": time.perf_counter() - started,
                  "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["message"] == ("upload.parquet rows 0..3: row 3 declares 100000x100000 pixels, over "
                                 "data.max_image_pixels=120000000 (a decompression bomb?): it was not decoded; raise "
                                 "the limit if such images are expected")
    assert result["seconds"] < 1.0 and result["grew_mb"] < 50
    from tasks.preprocess.image_format import ImageFormat

    with pytest.raises(PipelineError, match=r"row 0 declares 3000x4000 pixels, over data.max_image_pixels=10000000"):
        decode_images(pa.array([bomb_png(4000, 3000)], pa.binary()), None, "x", ImageFormat(max_pixels=10_000_000))


def test_truncated_and_wrong_shaped_images_name_their_row():
    good = png(np.full((28, 28), 7, np.uint8))
    with pytest.raises(PipelineError, match=r"^f rows 0\.\.2: row 1 is not a decodable PNG image \("):
        decode_images(pa.array([good, good[: len(good) // 2], good], pa.binary()), [28, 28], "f rows 0..2")
    with pytest.raises(PipelineError, match=r"^f: row 2 is 28x30 pixels, expected 28x28"):
        decode_images(pa.array([good, good, png(np.zeros((28, 30), np.uint8))], pa.binary()), [28, 28], "f")
    with pytest.raises(PipelineError, match=r"^f: row 1 decodes to \[28, 28, 3\], expected \[28, 28, 1\]"):
        decode_images(pa.array([good, png(np.zeros((28, 28, 3), np.uint8))], pa.binary()), [28, 28], "f")
    assert decode_images(pa.array([good, good], pa.binary()), None, "f").shape == (2, 28, 28, 1)


def test_predict_refuses_a_hostile_png_in_one_line(trained, tmp_path):
    _, _, model = trained
    rows = [png(np.zeros((28, 28), np.uint8))] * 5 + [bomb_png(60_000, 60_000)]
    pq.write_table(pa.table({"image": pa.array(rows, pa.binary())}), tmp_path / "upload.parquet")
    out = tmp_path / "out.parquet"
    code, _, err = invoke_cli("predict", "--model", model.uri, "--allow-unblessed", "--input",
                              str(tmp_path / "upload.parquet"), "--output", str(out), "--set", f"artifacts.root={tmp_path}")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "row 5 declares 60000x60000 pixels, over data.max_image_pixels=120000000 (a decompression bomb?)" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.parquet.tmp-*"))
