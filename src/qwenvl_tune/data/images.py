"""The one image loader: safe decoding, EXIF orientation, mode normalisation to RGB."""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .records import ImageError

# Qwen-VL patches are 14 px and merged 2x2, so the processor needs at least 28 px a side.
MIN_SIDE = 28
# The processor rejects images whose long side is more than 200x the short side.
MAX_ASPECT = 200


def load_image(
    path: str | Path,
    *,
    max_pixels: int = 178_956_970,
    where: tuple[str | None, int | None] = (None, None),
) -> Image.Image:
    """Open an image file as an RGB PIL image.

    EXIF orientation is applied once; grayscale, palette, CMYK and 16-bit images
    are converted; transparency is composited on white.

    Args:
        path: the image file.
        max_pixels: decompression-bomb guard (width*height).
        where: (annotations file, line) to name in errors.

    Raises:
        ImageError: naming the file, line and field ``image``.
    """
    path = Path(path)
    # the file itself is the place when no annotation line is: its name is then said once, not twice
    named = where[0] is not None
    where = (where[0] if named else str(path), where[1])
    say = f"{path.name}: " if named else ""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{say}file not found", *where, "image") from None
    except OSError as e:
        raise ImageError(f"{say}cannot read: {e.strerror}", *where, "image") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{say}is a folder, not an image or PDF file", *where, "image")
    return _decode(path, path.name, st.st_size, max_pixels, where, named)


def load_image_bytes(data: bytes, name: str = "upload", *, max_pixels: int = 178_956_970) -> Image.Image:
    """Like ``load_image``, for an uploaded file's (or a table cell's) bytes: messages start with ``name``, as the
    service's (one per file of a request) and a table's (re-raised at its row) name no other place."""
    return _decode(io.BytesIO(data), name, len(data), max_pixels, (name, None), named=True)


def _decode(source, name: str, size: int, max_pixels: int, where: tuple, named: bool) -> Image.Image:
    """``named``: messages start with the file's name, as the place they are raised at is another (an annotation
    line, a table row, a request)."""
    file, line = where

    def fail(msg: str) -> ImageError:
        return ImageError(f"{name}: {msg}" if named else msg, file or name, line, "image")

    if size == 0:
        raise fail("file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise fail(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (data.max_image_pixels)")
                if getattr(im, "n_frames", 1) > 1:
                    raise fail(f"animated or multi-frame image ({im.n_frames} frames); save a single frame")
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        # PIL's own message names its file object (an in-memory buffer for uploads): say it plainly
        raise fail("not a readable image (not a format PIL can identify: JPEG, PNG, TIFF, WebP, BMP, GIF, ...)") \
            from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise fail(f"not a readable image: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise fail(f"corrupt or truncated image: {e}") from None
    w, h = rgb.size
    if min(w, h) < MIN_SIDE:
        raise fail(f"{w}x{h} is smaller than the model's minimum of {MIN_SIDE} px a side")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise fail(f"aspect ratio {max(w, h) / min(w, h):.0f}:1 exceeds the processor's limit of {MAX_ASPECT}:1")
    return rgb


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        scale = 255.0 / hi if hi > 255 else 1.0
        im = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im
