"""Large photos made cheap to cut views from, without changing what is learned.

A 12-megapixel phone JPEG takes ~160 ms to decode on one core, and views are cut from the original every
epoch. The start-up scan decodes every file once anyway (to find corrupt ones); while it holds a large
image it writes a shrunk copy (longer side ``data.max_side``) to a cache keyed by the file's content (the
SHA-256 of its bytes, read once by the scan that decodes them anyway), so later epochs and runs decode ~0.3
megapixels instead of 12, and a file replaced by another of the same size and date gets its own copy. Crop
boxes are still drawn in the original's pixel coordinates (matching, ``viz-matches`` and resume are unchanged)
and mapped onto the copy. JPEGs are decoded in draft mode (DCT scaling) when shrunk: still a full entropy
decode, so a truncated file is still caught, at about half the cost.

The default bound keeps every view at one source pixel per view pixel or more (see :func:`auto_max_side`).
A copy that cannot be written (a full or read-only disk) is said once and the original is used: a cache problem
is never a bad image. The copies are kept under a size bound (``PWSELF_CACHE_MAX_GB``, default 20), the least
recently written removed first; ``pwself cache`` shows and clears them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["open_image", "auto_max_side", "oriented_size", "shrunk_path", "shrink_image", "store_shrunk",
           "open_for_views", "content_digest", "evict_shrunk", "cache_bound", "cache_usage", "write_synthetic_photo",
           "SHRUNK_QUALITY", "clear_cache"]

log = logging.getLogger(__name__)

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


def content_digest(data: bytes) -> str:
    """The key of a file's content: SHA-256 of its bytes (hex, 32 characters)."""
    return hashlib.sha256(data).hexdigest()[:32]


def shrunk_path(cache_dir: Path, digest: str, channels: int, max_side: int) -> Path:
    """Where the shrunk copy of a file with content ``digest`` lives, for ``channels`` and the bound: an edited or
    replaced file (whatever its size and date) gets a new copy, two names of one file share one."""
    return cache_dir / "shrunk" / f"{digest}-{channels}-{max_side}.jpg"


def shrink_image(im: PILImage, channels: int, max_side: int) -> PILImage:
    """An open (not yet decoded) image with its longer side brought to ``max_side``. JPEGs decode in draft mode at
    the smallest DCT scale still above the bound (a full entropy decode all the same: a truncated file fails)."""
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
    return small


_warned_dirs: set[Path] = set()


def store_shrunk(small: PILImage, dest: Path) -> bool:
    """Write a shrunk copy atomically (a temporary file of its own, every byte checked, fsync, rename). A copy
    that cannot be written leaves nothing behind, is said once per folder and returns ``False``: the caller
    uses the image it holds (the original's pixels), never calls the photo bad."""
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=SHRUNK_QUALITY, subsampling=0)
    data = buf.getvalue()
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            written = f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if written != len(data) or os.path.getsize(tmp) != len(data):
            raise OSError(f"short write ({written} of {len(data)} bytes)")
        os.replace(tmp, dest)
        return True
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if dest.parent not in _warned_dirs:
            _warned_dirs.add(dest.parent)
            log.warning("cannot write shrunk copies to %s (%s): training reads the original photos instead "
                        "(slower; free space there or set PWSELF_CACHE_DIR)", dest.parent, e.strerror or e)
        return False


def open_for_views(path: Path, channels: int, max_side: int, cache_dir: Path,
                   digest: str | None = None) -> tuple[PILImage, tuple[int, int]]:
    """The image to cut views from and the original's oriented ``(width, height)`` (the box coordinates).

    ``max_side <= 0``, a small image or no content ``digest``: the original itself. Otherwise the cached shrunk
    copy, made here when missing or unreadable (a copy that cannot be written: the shrunk image in memory).
    """
    from PIL import Image

    if max_side <= 0:
        im = open_image(path, channels)
        return im, im.size
    size = oriented_size(path)
    if max(size) <= max_side:
        return open_image(path, channels), size
    if digest is None:
        with Image.open(path) as im:
            return shrink_image(im, channels, max_side), size
    dest = shrunk_path(cache_dir, digest, channels, max_side)
    try:
        with Image.open(dest) as small:
            return small.convert("L" if channels == 1 else "RGB"), size
    except (OSError, ValueError):
        with Image.open(path) as im:
            small = shrink_image(im, channels, max_side)
        store_shrunk(small, dest)
        return small, size


def cache_bound() -> int:
    """The shrunk copies' size bound in bytes (``PWSELF_CACHE_MAX_GB``, default 20; 0: no bound)."""
    try:
        return int(float(os.environ.get("PWSELF_CACHE_MAX_GB", "20")) * 1e9)
    except ValueError:
        raise ValueError(f"PWSELF_CACHE_MAX_GB={os.environ['PWSELF_CACHE_MAX_GB']!r} is not a number: set it to "
                         "the gigabytes the shrunk copies may take, e.g. PWSELF_CACHE_MAX_GB=20") from None


def cache_usage(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """``{"shrunk copies": (files, bytes), "scan records": (files, bytes)}`` of a pwself cache folder."""
    out = {}
    for name, folder, pattern in (("shrunk copies", "shrunk", "*.jpg"), ("scan records", "scans", "*.json")):
        sizes = [p.stat().st_size for p in (cache_dir / folder).glob(pattern)] if (cache_dir / folder).is_dir() else []
        out[name] = (len(sizes), sum(sizes))
    return out


def clear_cache(cache_dir: Path) -> None:
    """Remove every shrunk copy and scan record (the next run's scan makes them again)."""
    import shutil

    for sub in ("shrunk", "scans"):
        shutil.rmtree(cache_dir / sub, ignore_errors=True)


def evict_shrunk(cache_dir: Path, max_bytes: int, keep: set[Path] = frozenset()) -> tuple[int, int]:
    """Remove the least recently written shrunk copies (never those in ``keep``, the current run's) until the
    copies take at most ``max_bytes`` (0: no bound). Returns ``(files removed, bytes freed)``."""
    folder = cache_dir / "shrunk"
    if max_bytes <= 0 or not folder.is_dir():
        return 0, 0
    files = []
    for p in folder.glob("*.jpg"):
        try:
            st = p.stat()
        except OSError:
            continue
        files.append((st.st_mtime_ns, st.st_size, p))
    total = sum(size for _, size, _ in files)
    removed = freed = 0
    for _, size, p in sorted(files):
        if total <= max_bytes:
            break
        if p in keep:
            continue
        p.unlink(missing_ok=True)
        total, removed, freed = total - size, removed + 1, freed + size
    return removed, freed


def write_synthetic_photo(path: Path, width: int, height: int, seed: int = 0, orientation: int = 1,
                          quality: int = 90) -> Path:
    """A photo-like RGB JPEG for tests and benchmarks (in the package because both use it): smooth random
    content (a coarse random field resized bicubically) plus sensor-like Gaussian noise (sigma 3 grey levels);
    ``orientation`` is the EXIF tag saved with it (1: none; 6: the camera was turned, the stored pixels are
    rotated)."""
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
