"""Dense (per-pixel) labelled data: ``DIR/{train,test}/images/*`` with ``DIR/{train,test}/masks/STEM.png``.

A mask holds one class index per pixel, 255 = ignore (the ADE20K / Pascal VOC convention). The number of
classes comes from ``DIR/classes.json`` (a list of names, as ``pwself make-scenes`` writes) when it exists,
else from the largest index found in the masks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from pwself.data.datasets import IMAGE_EXTENSIONS, DatasetError, expand_path, open_image

__all__ = ["IGNORE_INDEX", "DenseSplit", "open_dense", "dense_classes", "dense_input"]

IGNORE_INDEX = 255


def _mask_array(path: Path, size: int = 0) -> np.ndarray:
    """A mask's class indices (int64), brought to ``size x size`` by nearest resizing when ``size`` is set (so a
    split's items never hold a full-size int64 array: a phone-size mask is 100 MB as int64)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise DatasetError(f"mask {path} has mode {im.mode}: save masks as single-channel PNGs of class indices")
        if size and im.size != (size, size):
            im = im.resize((size, size), Image.NEAREST)
        return np.asarray(im).astype(np.int64)


def _check_mask_size(mask: Path, mask_size: tuple[int, int], image: Path) -> None:
    """One line when a mask's ``(width, height)`` differs from its image's (read from the image's header)."""
    with Image.open(image) as im:
        if mask_size != im.size:
            raise DatasetError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image is "
                               f"{im.size[0]}x{im.size[1]}: a mask must have its image's size")


@dataclass
class DenseSplit(Dataset):
    """One split: image files and their masks, read on access.

    Yields ``(uint8 [C, size, size] image resized to the model's input, long mask)``: the mask at its full
    size, or with ``mask_size`` brought to ``mask_size x mask_size`` (nearest: no class is invented), the
    square the image is resized to. Evaluating at a fixed size keeps photo-size masks cheap.
    """

    images: list[Path]
    masks: list[Path]
    channels: int
    size: int
    mask_size: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        try:
            im = open_image(self.images[i], self.channels)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            raise DatasetError(f"cannot decode image {self.images[i]} ({type(e).__name__}: {e}): fix or remove it "
                               "and its mask") from None
        with Image.open(self.masks[i]) as m:  # the header only
            _check_mask_size(self.masks[i], m.size, self.images[i])
        mask = _mask_array(self.masks[i], self.mask_size)
        im = im.resize((self.size, self.size), Image.BICUBIC) if im.size != (self.size, self.size) else im
        t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
        return (t[None] if t.ndim == 2 else t.permute(2, 0, 1)), torch.from_numpy(mask)


def _split_files(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    img_dir, mask_dir = root / split / "images", root / split / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DatasetError(f"no folder {d}: a dense dataset has {root}/{{train,test}}/images and .../masks "
                               "(make one with `pwself make-scenes OUT`)")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DatasetError(f"no images in {img_dir}: put the {split} images there")
    masks = [mask_dir / f"{p.stem}.png" for p in images]
    missing = [m for m in masks if not m.exists()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) in {img_dir} have no mask, e.g. {missing[0]}: every image needs "
                           "masks/STEM.png")
    return images, masks


def dense_classes(root: str | Path, splits: list[DenseSplit]) -> list[str]:
    """Class names: ``classes.json`` when present, else ``0..max`` over the masks; checks every mask value."""
    root = expand_path(root)
    seen = 0
    for split in splits:
        scored = False
        for image, m in zip(split.images, split.masks):
            array = _mask_array(m)
            _check_mask_size(m, (array.shape[1], array.shape[0]), image)
            values = np.unique(array)
            values = values[values != IGNORE_INDEX]
            if len(values) and (values.min() < 0 or values.max() > 254):
                raise DatasetError(f"mask {m} holds class {int(values.max())}: class indices are 0..254, 255 = ignore")
            seen = max(seen, int(values.max()) + 1 if len(values) else 0)
            scored = scored or bool(len(values))
        if not scored and split.masks:
            raise DatasetError(f"every mask pixel in {split.masks[0].parent} is 255 (ignore): that split has nothing "
                               "to learn from or score; label some pixels with their class index")
    names_file = root / "classes.json"
    if names_file.exists():
        names = json.loads(names_file.read_text())
        if seen > len(names):
            raise DatasetError(f"a mask holds class {seen - 1} but {names_file} names {len(names)} classes: fix the "
                               "mask or the class list")
        return [str(n) for n in names]
    if seen == 0:
        raise DatasetError(f"every mask pixel under {root} is 255 (ignore): there is nothing to score")
    return [str(c) for c in range(seen)]


def open_dense(root: str | Path, split: str, channels: int, size: int, mask_size: int = 0) -> DenseSplit:
    """One split of a dense dataset, images resized to ``size`` for the model, masks to ``mask_size`` (0: as
    they are)."""
    root = expand_path(root)
    if not root.is_dir():
        raise DatasetError(f"dense dataset {root} does not exist: pass --data DIR (make one with "
                           "`pwself make-scenes OUT`)")
    images, masks = _split_files(root, split)
    return DenseSplit(images, masks, channels, size, mask_size)


def dense_key(root: str | Path) -> str:
    """What a dense dataset holds, as a short hash: both splits' images and masks (names and contents) and its
    ``classes.json``. Scores measured on it are cached under this key: another ``--dense`` folder, or an edited
    mask, is measured again."""
    import hashlib

    from pwself.data import fingerprint

    root = expand_path(root)
    h = hashlib.sha256()
    for split in ("train", "test"):
        h.update(fingerprint(open_dense(root, split, 1, 8)).encode())
    if (root / "classes.json").is_file():
        h.update((root / "classes.json").read_bytes())
    return h.hexdigest()[:24]


def dense_input(root: str | Path) -> tuple[int, int]:
    """``(channels, side)`` of a dense dataset's first training image: the input a timm model is built for."""
    with Image.open(open_dense(root, "train", 3, 8).images[0]) as im:
        return (1 if im.mode in ("L", "I", "I;16") else 3), min(im.size)
