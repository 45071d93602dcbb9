"""An offline dense dataset made from Fashion-MNIST: several items per canvas, every pixel labelled.

``make_scenes(OUT)`` writes the dense layout that :mod:`pwself.data.dense` reads (``OUT/{train,test}/images``
and ``masks``: 0 = background, 1 + the Fashion-MNIST class for an item's pixels, 255 = ignore for the faint
rim of an item, whose class a human could not tell either) and, as hard links to the same files,
``OUT/dominant/{train,test}/<class>/`` labelled by the class covering most pixels, so the image-level
protocols (kNN, linear) and pretraining read the same scenes as ``data.kind=folder data.root=OUT/dominant``.
Train scenes take items of the train split only, test scenes of the test split only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pwself.data.datasets import FASHION_MNIST_DIR, DatasetError, load_idx_dataset
from pwself.run.folder import move_aside

__all__ = ["FASHION_MNIST_CLASSES", "SceneSpec", "make_scenes", "render_scene"]

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IGNORE = 255
# An item's pixel darker than this (of 255) is its faint rim, hard to tell from background: ignored.
FAINT = 16


@dataclass(frozen=True)
class SceneSpec:
    """How the scenes are drawn.

    Attributes:
        size: Canvas side in pixels.
        n_train: Scenes made from the train split.
        n_test: Scenes made from the test split.
        items: Smallest and largest number of items on a canvas.
        item_size: Smallest and largest item side in pixels (the 28 px item is resized to it).
        seed: Seed of everything (the test split uses its own stream).
    """

    size: int = 42
    n_train: int = 10000
    n_test: int = 2000
    items: tuple[int, int] = (2, 4)
    item_size: tuple[int, int] = (14, 28)
    seed: int = 0

    def check(self) -> None:
        if self.size < 8 or self.n_train < 1 or self.n_test < 1:
            raise DatasetError(f"scenes of {self.size} px, {self.n_train} train, {self.n_test} test: use a size >= 8 "
                               "and at least one scene per split")
        if not 1 <= self.items[0] <= self.items[1]:
            raise DatasetError(f"items={self.items}: use 1 <= MIN <= MAX")
        if not 4 <= self.item_size[0] <= self.item_size[1] <= self.size:
            raise DatasetError(f"item sizes {self.item_size} must lie in [4, {self.size}] (the canvas side)")


def render_scene(items: torch.Tensor, classes: torch.Tensor, spec: SceneSpec,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One canvas: ``items`` (uint8 ``[K, 28, 28]``) resized and placed at random, each later one in front
    of the earlier ones wherever it has ink (its non-zero pixels). Returns the uint8 image ``[S, S]`` and
    the mask (0 background, 1 + class of the front item, 255 where that item is only a faint rim)."""
    s = spec.size
    image = np.zeros((s, s), np.uint8)
    owner = np.full((s, s), -1, np.int64)  # which item is in front at each pixel
    for k, item in enumerate(items):
        side = int(rng.integers(spec.item_size[0], spec.item_size[1] + 1))
        small = F.interpolate(item[None, None].float(), size=(side, side), mode="bilinear", align_corners=False,
                              antialias=True)[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()
        top, left = (int(v) for v in rng.integers(0, s - side + 1, size=2))
        ink = small > 0
        image[top : top + side, left : left + side][ink] = small[ink]
        owner[top : top + side, left : left + side][ink] = k
    mask = np.zeros((s, s), np.uint8)
    covered = owner >= 0
    mask[covered] = 1 + classes.numpy()[owner[covered]]
    mask[covered & (image < FAINT)] = IGNORE
    return image, mask


def _class_folder(c: int) -> str:
    return f"{c:02d}_" + FASHION_MNIST_CLASSES[c].replace("/", "_").replace(" ", "_").lower()


def _write_split(out: Path, split: str, spec: SceneSpec, source_root: str, progress: bool) -> dict[str, int]:
    """``n`` scenes of one split: images, masks and the dominant-class links. Returns the per-class counts."""
    src = load_idx_dataset(source_root, split)
    n = spec.n_train if split == "train" else spec.n_test
    rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1])
    images_dir, masks_dir = out / split / "images", out / split / "masks"
    images_dir.mkdir(parents=True)
    masks_dir.mkdir(parents=True)
    for c in range(len(FASHION_MNIST_CLASSES)):
        (out / "dominant" / split / _class_folder(c)).mkdir(parents=True)
    counts = np.zeros(len(FASHION_MNIST_CLASSES), np.int64)
    for i in tqdm(range(n), desc=f"scenes {split}", disable=not progress, leave=False):
        k = int(rng.integers(spec.items[0], spec.items[1] + 1))
        pick = torch.from_numpy(rng.choice(len(src), size=k, replace=False))
        image, mask = render_scene(src.images[pick, 0], src.labels[pick], spec, rng)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(images_dir / name)
        Image.fromarray(mask).save(masks_dir / name)
        area = np.bincount(mask[(mask > 0) & (mask != IGNORE)].ravel() - 1, minlength=len(FASHION_MNIST_CLASSES))
        dominant = int(area.argmax())  # ties: the lower class index
        counts[dominant] += 1
        link = out / "dominant" / split / _class_folder(dominant) / name
        try:
            os.link(images_dir / name, link)
        except OSError:  # a file system without hard links: a copy
            shutil.copyfile(images_dir / name, link)
    return {FASHION_MNIST_CLASSES[c]: int(v) for c, v in enumerate(counts)}


def make_scenes(out: str | Path, spec: SceneSpec = SceneSpec(), source_root: str = FASHION_MNIST_DIR,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Write the scene dataset to ``out`` (refused when it exists, unless ``overwrite``, which moves the old folder
    aside whatever it held); returns its summary,
    also saved as ``out/scenes.json`` beside ``out/classes.json`` (the mask value of each class name)."""
    spec.check()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out} exists and is not empty: choose another OUT or pass --overwrite to replace it")
        log.warning("--overwrite: what was in %s is now in %s (moved aside, not deleted)", out, move_aside(out))
    out.mkdir(parents=True, exist_ok=True)
    dominant = {split: _write_split(out, split, spec, source_root, progress) for split in ("train", "test")}
    classes = ["background", *FASHION_MNIST_CLASSES]
    (out / "classes.json").write_text(json.dumps(classes, indent=2))
    summary = {"spec": asdict(spec), "source": str(source_root), "ignore_index": IGNORE, "classes": classes,
               "dominant_class_counts": dominant}
    (out / "scenes.json").write_text(json.dumps(summary, indent=2))
    return summary
