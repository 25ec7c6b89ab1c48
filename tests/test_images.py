"""base_models.images: every file PIL reads becomes the same RGB uint8 array, on real image files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from base_models.images import RESIZE_MODES, decode, load_rgb, resize_image
from oof import StackerError

WHITE, BLACK, RED, GREEN, BLUE = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)
ORIENTATION = 0x0112  # EXIF tag


def _split_image(mode, left, right, size=(8, 4)) -> Image.Image:
    """(W, H) = size image: left half `left`, right half `right`."""
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (8, 4), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    img.paste(1, (4, 0, 8, 4))
    if transparent:
        img.info["transparency"] = 0
    return img


def _one_bit() -> Image.Image:
    return _split_image("1", 0, 1)


def _rgba() -> Image.Image:
    return _split_image("RGBA", (255, 0, 0, 0), (0, 0, 255, 255))  # transparent red | opaque blue


def _la() -> Image.Image:
    return _split_image("LA", (50, 0), (50, 255))  # transparent dark grey | opaque dark grey


# (case, file name, image, expected left-half RGB, expected right-half RGB)
MODES = [
    ("L", "l.png", lambda: _split_image("L", 10, 200), (10,) * 3, (200,) * 3),
    ("LA", "la.png", _la, WHITE, (50,) * 3),
    ("P", "p.png", lambda: _palette(False), RED, BLUE),
    ("P-transparency", "pt.png", lambda: _palette(True), WHITE, BLUE),
    ("RGBA", "rgba.png", _rgba, WHITE, BLUE),
    ("1-bit", "bit.png", _one_bit, BLACK, WHITE),
    ("RGB-bmp", "rgb.bmp", lambda: _split_image("RGB", RED, GREEN), RED, GREEN),
]


@pytest.mark.parametrize("name, make, left, right", [m[1:] for m in MODES], ids=[m[0] for m in MODES])
def test_every_mode_becomes_rgb(tmp_path, name, make, left, right):
    path = tmp_path / name
    img = make()
    img.save(path, **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
    assert Image.open(path).mode == img.mode  # the file really holds that mode
    out = decode(path, (4, 8))  # the file's own size: no resampling
    assert out.dtype == np.uint8 and out.shape == (4, 8, 3)
    assert (out[:, :4] == left).all(), out[0, :4]
    assert (out[:, 4:] == right).all(), out[0, 4:]


def test_half_transparent_pixels_are_composed_on_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(path)
    out = decode(path, (4, 4))
    # black at alpha 128/255 over white: 255 * (1 - 128/255) = 127
    assert np.abs(out.astype(int) - 127).max() <= 1


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    out = decode(path, (16, 16))
    assert np.abs(out.astype(int) - RED).max() <= 3


def test_16_bit_png_uses_the_full_range(tmp_path):
    path = tmp_path / "deep.png"
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    out = decode(path, (8, 8))
    expected = np.floor(ramp / 65535 * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out.min() == 0 and out.max() == 255  # scaled, not clipped at 255


@pytest.mark.parametrize("orientation, size, first_half, second_half, axis", [
    (1, (20, 40), RED, BLUE, 1),   # as stored: (H, W) = (20, 40), left red | right blue
    (3, (20, 40), BLUE, RED, 1),   # rotated 180: left blue | right red
    (6, (40, 20), RED, BLUE, 0),   # rotate 90 clockwise to display: the left edge goes to the top
    (8, (40, 20), BLUE, RED, 0),   # rotate 90 counter-clockwise: the left edge goes to the bottom
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, first_half, second_half, axis):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    _split_image("RGB", RED, BLUE, size=(40, 20)).save(path, exif=exif, quality=95)
    assert Image.open(path).getexif()[ORIENTATION] == orientation
    h, w = size
    assert load_rgb(path).size == (w, h)
    out = decode(path, size).astype(int)
    assert out.shape == (h, w, 3)
    half = out.shape[axis] // 2
    first = out[:half - 2] if axis == 0 else out[:, :half - 2]
    second = out[half + 2:] if axis == 0 else out[:, half + 2:]
    assert np.abs(first - first_half).max() <= 8
    assert np.abs(second - second_half).max() <= 8


def _truncated_jpeg(path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, write, match", [
    ("cut.jpg", _truncated_jpeg, r"cut\.jpg: cannot decode image"),
    ("notes.jpg", lambda p: p.write_text("these are my notes, not a photo\n"), r"notes\.jpg: cannot decode image"),
    ("empty.png", lambda p: p.write_bytes(b""), r"empty\.png: cannot decode image"),
    ("absent.jpg", lambda p: None, r"absent\.jpg: image file not found"),
])
def test_bad_image_file_is_named(tmp_path, name, write, match):
    path = tmp_path / name
    write(path)
    with pytest.raises(StackerError, match=match):
        decode(path, (16, 16))


@pytest.fixture
def bands(tmp_path):
    """(H, W) = (20, 60) file: red | green | blue vertical bands, 20 px each."""
    img = Image.new("RGB", (60, 20))
    for i, c in enumerate((RED, GREEN, BLUE)):
        img.paste(c, (20 * i, 0, 20 * i + 20, 20))
    img.save(tmp_path / "bands.png")
    return tmp_path / "bands.png"


def test_squish_stretches_the_whole_image(bands):
    out = decode(bands, (20, 20), "squish").astype(int)
    assert out.shape == (20, 20, 3)
    # each 20 px band is squeezed to ~6.7 px; band interiors keep their colour
    assert np.abs(out[:, :5] - RED).max() <= 2
    assert np.abs(out[:, 8:12] - GREEN).max() <= 2
    assert np.abs(out[:, 15:] - BLUE).max() <= 2
    # stretched the other way: a tall output keeps three bands side by side
    tall = decode(bands, (40, 6), "squish").astype(int)
    assert tall.shape == (40, 6, 3)
    assert np.abs(tall[:, 0] - RED).max() <= 2 and np.abs(tall[:, -1] - BLUE).max() <= 2


def test_crop_keeps_the_centre(bands):
    out = decode(bands, (20, 20), "crop").astype(int)
    assert out.shape == (20, 20, 3)
    assert np.abs(out - GREEN).max() <= 2  # the centre band only; red and blue are cut


def test_pad_adds_black_borders(bands):
    out = decode(bands, (20, 20), "pad").astype(int)
    assert out.shape == (20, 20, 3)
    # 60x20 fits as 20x~7 in the middle rows; rows above and below are zero
    assert (out[:5] == 0).all() and (out[15:] == 0).all()
    middle = out[9]
    assert np.abs(middle[:5] - RED).max() <= 2
    assert np.abs(middle[8:12] - GREEN).max() <= 2
    assert np.abs(middle[15:] - BLUE).max() <= 2


def test_pad_tall_image_borders_left_and_right(tmp_path):
    path = tmp_path / "tall.png"
    Image.new("RGB", (10, 40), GREEN).save(path)
    out = decode(path, (20, 20), "pad").astype(int)
    assert (out[:, :6] == 0).all() and (out[:, 15:] == 0).all()
    assert np.abs(out[:, 8:12] - GREEN).max() <= 2


def test_unknown_resize_mode_is_refused(bands):
    with pytest.raises(StackerError, match=r"resize mode 'stretch' is not one of \['squish', 'crop', 'pad'\]"):
        resize_image(load_rgb(bands), (8, 8), "stretch")
    assert RESIZE_MODES == ("squish", "crop", "pad")


def test_jpeg_draft_matches_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    yy, xx = np.mgrid[0:1200, 0:1600]
    smooth = np.stack([127 + 100 * np.sin(xx / 150), 127 + 100 * np.cos(yy / 120), (xx + yy) / 2800 * 255], -1)
    Image.fromarray(smooth.astype(np.uint8)).save(path, quality=90)
    size = (48, 64)
    # the draft really is taken: 1/8 scale keeps both sides >= 64
    assert load_rgb(path, draft_size=(64, 48)).size == (200, 150)
    fast = decode(path, size).astype(int)
    full = resize_image(load_rgb(path), size, "squish").astype(int)
    assert fast.shape == full.shape == (48, 64, 3)
    diff = np.abs(fast - full)
    assert diff.mean() < 1.0 and diff.max() <= 8
