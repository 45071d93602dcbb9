"""Multi-crop views of image files cut from the full-resolution originals, in DataLoader workers.

DINO's RandomResizedCrop draws each crop in the original image's own pixels and resamples it straight to
the view size; a folder of photos is never shrunk to a small square first. Each sample's boxes come from the
shared box sampler (:func:`pwself.views.sample_boxes`) with a generator seeded by (run seed, epoch, image
index), so the views do not depend on which worker cut them, and a resumed run cuts the same ones. The boxes
stay in original-image pixels for matching (docs/algorithm.md §1-3). Photometric augmentation stays batched on the
training device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pwself.data.datasets import DatasetError, worker_error
from pwself.data.photos import open_for_views
from pwself.views import CROP_RATIO, MultiCropViews, ViewConfig, sample_boxes

__all__ = ["sample_seed", "cut_views", "FolderMultiCrop", "collate_views", "ViewLoader"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's crops in one epoch (a 63-bit mix; no two (epoch, index) of a run collide)."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 63)


def cut_views(image: object, spec: ViewConfig, generator: torch.Generator, source_size: tuple[int, int] | None = None,
              ) -> tuple[list[Tensor], Tensor, Tensor]:
    """The crops of one PIL image: ``(uint8 [C, S, S] per view, boxes [V, 4], flips [V])``, globals first.

    Each box is resampled from the image with Pillow's bicubic resize over exactly that box (antialiased
    when shrinking), then flipped when drawn so. ``source_size``: the ``(width, height)`` of the original when
    ``image`` is a shrunk copy of it; boxes are drawn and returned in the original's pixels and mapped onto
    the copy for resampling.
    """
    from PIL import Image

    w, h = source_size or image.size
    sx, sy = image.size[0] / w, image.size[1] / h
    boxes = torch.cat([sample_boxes(spec.n_global, h, w, spec.global_scale, CROP_RATIO, generator),
                       sample_boxes(spec.n_local, h, w, spec.local_scale, CROP_RATIO, generator)])
    flips = torch.rand(spec.n_global + spec.n_local, generator=generator) < spec.flip_p
    sizes = [spec.global_size] * spec.n_global + [spec.local_size] * spec.n_local
    crops = []
    for box, flip, size in zip(boxes.tolist(), flips.tolist(), sizes):
        crop = image.resize((size, size), Image.BICUBIC, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        arr = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy())
        crops.append(arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1))
    return crops, boxes, flips


class FolderMultiCrop(Dataset):
    """The views of image files, cut from the originals. Indexed by ``(image index, epoch)``.

    Args:
        files: Image paths (checked already: :class:`pwself.data.ImageFolderDataset` decodes each at start).
        channels: 1 (grayscale) or 3 (RGB).
        spec: The views.
        seed: The run's seed.
        max_side: Cut from the cached shrunk copy of an image whose longer side is above this
            (:mod:`pwself.data.photos`; boxes stay in the original's pixels); 0: always from the original.
        cache_dir: Where the shrunk copies live.
        digests: Each file's content digest from the start-up scan (the shrunk copy's key); ``None``: no copies.
    """

    def __init__(self, files: Sequence[Path], channels: int, spec: ViewConfig, seed: int, max_side: int = 0,
                 cache_dir: Path | None = None, digests: Sequence[str] | None = None) -> None:
        self.files, self.channels, self.spec, self.seed = list(files), channels, spec, seed
        self.max_side, self.cache_dir = max_side, cache_dir or Path(".")
        self.digests = list(digests) if digests is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[Tensor], Tensor, Tensor]:
        index, epoch = key
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        try:
            digest = self.digests[index] if self.digests is not None else None
            image, size = open_for_views(self.files[index], self.channels, self.max_side, self.cache_dir, digest)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            raise DatasetError(f"cannot decode {self.files[index]} ({type(e).__name__}): it changed since the "
                               "start-up check; delete or replace it and resume with --resume") from None
        return cut_views(image, self.spec, generator, size)


def collate_views(samples: list[tuple[list[Tensor], Tensor, Tensor]], n_global: int) -> MultiCropViews:
    """Per-sample crops -> one view-major :class:`MultiCropViews` of uint8 crops."""
    crops = [torch.stack([s[0][v] for s in samples]) for v in range(len(samples[0][0]))]  # [V] x [B, C, S, S]
    n_local = len(crops) - n_global
    local = torch.cat(crops[n_global:]) if n_local else crops[0].new_zeros((0, *crops[0].shape[1:2], 1, 1))
    return MultiCropViews(torch.cat(crops[:n_global]), local, torch.stack([s[1] for s in samples], 1),
                          torch.stack([s[2] for s in samples], 1), n_global, n_local)


class _EpochBatches:
    """A batch sampler whose batches are set per epoch, so one DataLoader (persistent workers) serves all."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ViewLoader:
    """Batches of views cut in ``num_workers`` persistent worker processes (pinned memory on CUDA)."""

    def __init__(self, dataset: FolderMultiCrop, num_workers: int, pin_memory: bool) -> None:
        self.sampler = _EpochBatches()
        n_global = dataset.spec.n_global
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, pin_memory=pin_memory,
                                 collate_fn=lambda samples: collate_views(samples, n_global))

    def epoch(self, batches: Sequence[Tensor], epoch: int) -> Iterator[MultiCropViews]:
        """The views of the given index batches of one epoch, in order."""
        self.sampler.batches = [[(int(i), epoch) for i in b] for b in batches]
        try:
            yield from self.loader
        except Exception as e:  # noqa: BLE001 - re-raised; one line when it came from a worker
            raise (worker_error(e) or e) from None
