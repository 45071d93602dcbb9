"""Photo-like test images (moved out of the package: only the tests use them)."""

from pathlib import Path

import numpy as np

_ORIENTATION = 0x0112  # the EXIF orientation tag


def write_synthetic_photo(path: Path, width: int, height: int, seed: int = 0, orientation: int = 1,
                          quality: int = 90) -> Path:
    """A photo-like RGB JPEG for tests: smooth random content (a coarse random field resized
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
