"""Fuzz: random bytes, truncations and byte flips of real images never crash the folder loader.

Every input either loads as a uint8 [C, S, S] image or ends in a DatasetError naming the file
(fail mode), or is skipped and reported (skip mode). Nothing else may escape.
"""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pwself.data import DatasetError
from pwself.data.datasets import ImageFolderDataset


def _real_image_bytes(rng: random.Random, fmt: str) -> bytes:
    mode = rng.choice(["RGB", "L", "RGBA", "I;16", "P"]) if fmt == "PNG" else rng.choice(["RGB", "L"])
    w, h = rng.randint(1, 40), rng.randint(1, 40)
    arr = np.random.default_rng(rng.randint(0, 1 << 30)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    im = im.convert("I;16") if mode == "I;16" else im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _mutations(n: int, seed: int = 0):
    rng = random.Random(seed)
    for k in range(n):
        kind = k % 4
        if kind == 0:
            yield "random", bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        else:
            data = bytearray(_real_image_bytes(rng, rng.choice(["PNG", "JPEG", "BMP"])))
            if kind == 1:  # truncated
                data = data[: rng.randint(0, len(data))]
            elif kind == 2:  # flipped bytes
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
            yield ("truncated", "flipped", "valid")[kind - 1], bytes(data)


@pytest.mark.slow
def test_fuzzed_files_load_or_fail_cleanly(tmp_path):
    counts = {"loaded": 0, "rejected": 0}
    for k, (kind, data) in enumerate(_mutations(240)):
        d = tmp_path / f"case{k}"
        d.mkdir()
        (d / f"x.{'png' if k % 2 else 'jpg'}").write_bytes(data)
        try:
            ds = ImageFolderDataset(d, 8, channels=3, min_size=1)
            x, y = ds[0]
            assert x.dtype == torch.uint8 and x.shape == (3, 8, 8) and y == -1
            counts["loaded"] += 1
        except DatasetError as e:
            assert "x." in str(e) or "unreadable" in str(e)
            assert len(str(e).splitlines()) == 1
            counts["rejected"] += 1
    assert counts["loaded"] > 40 and counts["rejected"] > 40, counts


def test_skip_mode_keeps_good_images_and_reports_each_bad_file_once(tmp_path, caplog):
    rng = random.Random(1)
    for k in range(3):
        (tmp_path / f"good{k}.png").write_bytes(_real_image_bytes(rng, "PNG"))
    (tmp_path / "junk.png").write_bytes(b"\x00" * 50)
    good = _real_image_bytes(rng, "PNG")
    (tmp_path / "zz_truncated.png").write_bytes(good[: len(good) - 20])  # header fine, data cut
    with caplog.at_level("WARNING", logger="pwself"):
        ds = ImageFolderDataset(tmp_path, 8, on_bad_image="skip", min_size=1)
        images = [ds[i][0] for i in range(len(ds))] + [ds[len(ds) - 1][0]]
    assert all(x.shape == (3, 8, 8) for x in images)
    names = sorted(p.name for p in ds.skipped)
    assert "junk.png" in names and len(names) == len(set(names))
    assert sum("skipping unreadable image" in r.getMessage() for r in caplog.records) == len(names)
