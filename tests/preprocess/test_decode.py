"""An encoded image to the pixels of the dataset's format with Pillow (tasks/preprocess/decode.py): each resize mode
against Pillow's own operations, every mode to the colour mode, EXIF orientation, a big JPEG decoded at a fraction
of its size first. Its twin in the serving graph is checked against it in tests/serve/test_export.py."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from tasks.preprocess.decode import decode_image
from tasks.preprocess.image_format import ImageFormat
from tests.conftest import jpeg_bytes, photo


def quadrants(height=60, width=90) -> Image.Image:
    """Four coloured quadrants: where each lands after a resize is easy to check."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2:] = (0, 255, 0)
    image[height // 2:, : width // 2] = (0, 0, 255)
    image[height // 2:, width // 2:] = (255, 255, 0)
    return Image.fromarray(image)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
def test_each_resize_mode_gives_the_shape_and_the_pixels_pillow_gives(resize):
    """Against Pillow's own operations, written here: resize, ImageOps.fit (centre crop) and ImageOps.pad."""
    image = quadrants()
    fmt = ImageFormat((40, 40), resize, "bilinear", 3)
    pixels = decode_image(png_bytes(image), "q", fmt)
    assert pixels.shape == (40, 40, 3) and pixels.dtype == np.uint8
    by_hand = {"stretch": image.resize((40, 40), Image.Resampling.BILINEAR),
               "crop": ImageOps.fit(image, (40, 40), Image.Resampling.BILINEAR),
               "pad": ImageOps.pad(image, (40, 40), Image.Resampling.BILINEAR, color=(0, 0, 0))}[resize]
    # Pillow widens its filter at any reduction, the graph from two-fold on (here 1.5x): the quadrants' edges blur
    # a little less, the rest is the same
    assert np.abs(pixels.astype(int) - np.asarray(by_hand)).mean() < 2.5
    if resize == "pad":  # a 90x60 image in a 40x40 square: black bars above and below
        assert pixels[:5].max() == 0 and pixels[-5:].max() == 0 and pixels[10, 5].tolist() == [255, 0, 0]
    if resize == "crop":  # the centre 60x60: the left quadrants lose a third of their width, no black
        assert pixels.reshape(-1, 3).sum(1).min() > 0


def test_modes_become_the_colour_mode_and_exif_orientation_is_applied():
    rgb = np.asarray(quadrants(20, 20))
    for mode in ("L", "P", "RGBA", "CMYK", "1", "I;16"):
        source = Image.fromarray(rgb).convert(mode if mode != "I;16" else "L")
        if mode == "I;16":
            source = Image.fromarray(np.asarray(source).astype(np.uint16) * 257)  # mode I;16
        blob = png_bytes(source) if mode != "CMYK" else jpeg_bytes(source)
        grey = decode_image(blob, mode, ImageFormat((20, 20), channels=1))
        colour = decode_image(blob, mode, ImageFormat((20, 20), channels=3))
        assert grey.shape == (20, 20, 1) and colour.shape == (20, 20, 3), mode
        if mode in ("L", "I;16"):  # grey to RGB repeats the channel; 16-bit keeps its top 8 bits
            np.testing.assert_array_equal(colour[..., 0], grey[..., 0])
            np.testing.assert_array_equal(grey[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    assert decode_image(png_bytes(quadrants(20, 20).convert("RGBA")), "a", ImageFormat(channels=None)).shape[-1] == 3
    assert decode_image(png_bytes(quadrants(20, 20).convert("L")), "a", ImageFormat(channels=None)).shape[-1] == 1
    stored = Image.fromarray(np.zeros((30, 60, 3), np.uint8))  # stored 30 high and 60 wide ...
    stored.putpixel((0, 0), (255, 255, 255))  # ... a white pixel at its top left
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": shown 60 high, 30 wide, the pixel at the top right
    blob = io.BytesIO()
    stored.save(blob, format="PNG", exif=exif.tobytes())
    shown = decode_image(blob.getvalue(), "r", ImageFormat(channels=3))
    assert shown.shape == (60, 30, 3) and shown[0, -1].tolist() == [255, 255, 255] and shown[0, 0].max() == 0


def test_a_jpeg_shrunk_a_lot_is_decoded_at_a_fraction_first_and_looks_the_same():
    big = Image.fromarray(photo(np.random.default_rng(1), 1600, 1200, 1))
    fmt = ImageFormat((64, 48), "stretch", "bilinear", 3)
    fast = decode_image(jpeg_bytes(big), "big", fmt)
    exact = np.asarray(Image.open(io.BytesIO(jpeg_bytes(big))).convert("RGB").resize((48, 64), Image.Resampling.BILINEAR))
    assert fast.shape == (64, 48, 3) and np.abs(fast.astype(int) - exact).mean() < 3
