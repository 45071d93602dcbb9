"""Large photos made cheap to cut views from, without changing what is learned.

A 12-megapixel phone JPEG takes ~160 ms to decode on one core, and views are cut from the original every
epoch. The start-up scan decodes every file once anyway (to find corrupt ones); while it holds a large
image it writes a shrunk copy (longer side ``data.max_side``) to a cache keyed by the file's path, size
and mtime, so later epochs and runs decode ~0.3 megapixels instead of 12. Crop boxes are still drawn in the
original's pixel coordinates (matching, ``viz-matches`` and resume are unchanged) and mapped onto the copy.
JPEGs are decoded in draft mode (DCT scaling) when shrunk: still a full entropy decode, so a truncated file
is still caught, at about half the cost.

The default bound keeps every view at one source pixel per view pixel or more (see :func:`auto_max_side`).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["open_image", "auto_max_side", "oriented_size", "shrunk_path", "write_shrunk", "open_for_views",
           "write_synthetic_photo",
           "SHRUNK_QUALITY"]

SHRUNK_QUALITY = 95  # with 4:4:4 chroma: the copy differs from a lossless one by well under a grey level
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 turn the image by 90 degrees


def _oriented(im: PILImage, channels: int) -> PILImage:
    """EXIF orientation applied, 16-bit rescaled to 8 bits, converted to L (1 channel) or RGB."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((255 * arr / max(arr.max(), 1)).astype(np.uint8))
    return im.convert("L" if channels == 1 else "RGB")


def open_image(path: Path, channels: int) -> PILImage:
    """Decode an image file to a Pillow image of ``channels`` (1: L, 3: RGB) at its full resolution.

    16-bit images are rescaled to 8 bits; EXIF orientation is applied; RGBA/P/L convert to L or RGB.
    """
    from PIL import Image

    with Image.open(path) as im:
        return _oriented(im, channels)


def auto_max_side(views: list[tuple[int, float]]) -> int:
    """The smallest longer side at which every view is cut at one source pixel per view pixel or more.

    ``views`` holds ``(view side, smallest crop scale)`` per kind of view. A crop of area fraction ``s`` of a
    4:3 photo with longer side ``L`` has side ``sqrt(s * L * 3L/4)``; it must be at least the view side. The
    largest such ``L`` over the views, rounded up to a multiple of 64 and at least 256 (ViT-S/16's 224/96 px
    views at DINO's scales: 512).
    """
    need = max(size / math.sqrt(scale * 0.75) for size, scale in views)
    return max(256, 64 * math.ceil(need / 64))


def oriented_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file after its EXIF orientation, from the header alone."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        turned = im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    return (h, w) if turned else (w, h)


def shrunk_path(cache_dir: Path, path: Path, channels: int, max_side: int) -> Path:
    """Where the shrunk copy of ``path`` lives: keyed by its absolute path, size, mtime, channels and bound,
    so an edited or replaced file gets a new copy."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{channels}|{max_side}"
    return cache_dir / "shrunk" / f"{hashlib.sha1(key.encode()).hexdigest()}.jpg"


def write_shrunk(im: PILImage, channels: int, max_side: int, dest: Path) -> PILImage:
    """Shrink an open (not yet decoded) image so that its longer side is ``max_side`` and write it to ``dest``
    atomically; returns the copy. JPEGs decode in draft mode at the smallest DCT scale still above the bound."""
    from PIL import Image

    w, h = im.size
    if im.format == "JPEG":
        scale = max_side / max(w, h)
        im.draft("L" if channels == 1 else "RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    small = _oriented(im, channels)
    factor = max_side / max(small.size)
    if factor < 1:
        size = (max(1, round(small.size[0] * factor)), max(1, round(small.size[1] * factor)))
        small = small.resize(size, Image.LANCZOS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    small.save(tmp, "JPEG", quality=SHRUNK_QUALITY, subsampling=0)
    tmp.replace(dest)
    return small


def open_for_views(path: Path, channels: int, max_side: int, cache_dir: Path) -> tuple[PILImage, tuple[int, int]]:
    """The image to cut views from and the original's oriented ``(width, height)`` (the box coordinates).

    ``max_side <= 0`` or a small image: the original itself. Otherwise the cached shrunk copy, made here
    when missing or unreadable (e.g. a run that started before the bound was set).
    """
    from PIL import Image

    if max_side <= 0:
        im = open_image(path, channels)
        return im, im.size
    size = oriented_size(path)
    if max(size) <= max_side:
        return open_image(path, channels), size
    dest = shrunk_path(cache_dir, path, channels, max_side)
    try:
        with Image.open(dest) as small:
            return small.convert("L" if channels == 1 else "RGB"), size
    except (OSError, ValueError):
        with Image.open(path) as im:
            return write_shrunk(im, channels, max_side, dest), size


def write_synthetic_photo(path: Path, width: int, height: int, seed: int = 0, orientation: int = 1,
                          quality: int = 90) -> Path:
    """A photo-like RGB JPEG for tests and benchmarks: smooth random content (a coarse random field resized
    bicubically) plus sensor-like Gaussian noise (sigma 3 grey levels); ``orientation`` is the EXIF tag saved
    with it (1: none; 6: the camera was turned, the stored pixels are rotated)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((max(2, height // 100), max(2, width // 100), 3)) * 255).astype(np.uint8))
    noisy = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    noisy += 3 * rng.standard_normal(noisy.shape, dtype=np.float32)
    im = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    exif = im.getexif()
    if orientation != 1:
        exif[_ORIENTATION] = orientation
    im.save(path, "JPEG", quality=quality, exif=exif.tobytes())
    return path
