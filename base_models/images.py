"""Decoding one image file to an RGB uint8 array of a fixed size.

Every mode PIL reads (L, LA, P, RGBA, CMYK, I;16, ...) becomes RGB; EXIF
orientation is applied; transparent pixels are composed on white (as browsers
show them). Resize modes follow fastai's names:

    squish  stretch to the size (aspect ratio not kept, nothing cut)
    crop    scale to cover, cut the centre
    pad     scale to fit, pad with zeros (black), as fastai's PadMode.Zeros
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from oof import StackerError

RESIZE_MODES = ("squish", "crop", "pad")


def load_rgb(path: str | Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open, fully decode and convert an image to RGB with EXIF orientation applied.

    Args:
        path: image file.
        draft_size: (W, H) the image will be reduced to; lets the JPEG decoder
            skip detail it would throw away (`Image.draft`, a scale of 1/2..1/8).

    Raises:
        StackerError: missing, unreadable or truncated file, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise StackerError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _draft(img, draft_size)
                img.load()  # decode now: a truncated file raises here, not later
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except StackerError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise StackerError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def decoded_size(path: str | Path, draft_size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(W, H) that `load_rgb(path, draft_size)` decodes at, before EXIF rotation, from the header alone
    (0.07 ms for a 640x480 JPEG); None when the file cannot be opened (decoding then names the problem)."""
    try:
        with Image.open(path) as img:
            _draft(img, draft_size)
            return img.size
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return None


def _draft(img: Image.Image, draft_size: tuple[int, int] | None) -> None:
    """Let a JPEG's decoder reduce the image by 1/2..1/8, keeping both sides at least max(draft_size)."""
    if draft_size is not None and img.format == "JPEG":
        m = max(draft_size)  # both sides at least the larger target side: EXIF may still rotate it
        img.draft("RGB", (m, m))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grey: scale the full range to 8 bits instead of clipping at 255
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def resize_image(img: Image.Image, size: tuple[int, int], mode: str = "squish") -> np.ndarray:
    """Resize to `size` = (H, W) by `mode`; returns (H, W, 3) uint8."""
    h, w = size
    if mode == "squish":
        out = img.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
    elif mode == "crop":
        out = ImageOps.fit(img, (w, h), Image.BICUBIC, centering=(0.5, 0.5))
    elif mode == "pad":
        out = ImageOps.pad(img, (w, h), Image.BICUBIC, color=(0, 0, 0), centering=(0.5, 0.5))
    else:
        raise StackerError(f"resize mode {mode!r} is not one of {list(RESIZE_MODES)}")
    return np.asarray(out, dtype=np.uint8)


def decode(path: str | Path, size: tuple[int, int], mode: str = "squish") -> np.ndarray:
    """One file to its cached form: (H, W, 3) uint8."""
    h, w = size
    return resize_image(load_rgb(path, draft_size=(w, h)), size, mode)
