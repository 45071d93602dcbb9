"""Local datasets and the batch iterator used by training and evaluation."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pwself.data.datasets import (
    FASHION_MNIST_DIR,
    DatasetError,
    ImageFolderDataset,
    TensorImageDataset,
    expand_path,
    folder_channels,
    make_synthetic,
    worker_error,
)
from pwself.data.kinds import DATA_KINDS, DataKind, OpenOptions, register_data_kind
from pwself.sections import NON_NEGATIVE, POSITIVE, ConfigError, check_choice, check_ranges

__all__ = [
    "DATA_KINDS",
    "DataKind",
    "register_data_kind",
    "DataConfig",
    "FASHION_MNIST_DIR",
    "DatasetError",
    "ImageFolderDataset",
    "TensorImageDataset",
    "build_dataset",
    "open_dataset",
    "open_training_data",
    "check_data_root",
    "TrainingData",
    "take_subset",
    "expand_path",
    "folder_channels",
    "has_heldout_split",
    "scorable",
    "iterate_batches",
    "channel_stats",
    "fingerprint",
    "make_synthetic",
]


@dataclass
class DataConfig:
    """Where the images come from.

    Attributes:
        kind: ``idx`` (MNIST/Fashion-MNIST files), ``cifar`` (python pickles), ``folder`` (images,
            recursively; ``train/`` and ``val/`` or ``test/`` sub-folders for evaluation) or ``synthetic``.
        root: Dataset directory (default: the Debian package ``dataset-fashion-mnist``).
        image_size: Side images of a ``folder`` are resized to for evaluation, at least ``views.global_size``
            (the side the model trains and is exported at; raised to it, said in one line); the side of
            ``synthetic`` images (``idx``/``cifar`` keep their native size). Images are read with
            ``backbone.in_chans`` channels.
        subset: Train on the first ``subset`` images only (0: all).
        num_workers: Decoding workers for ``folder``.
        on_bad_image: ``fail`` or ``skip`` for corrupt/too-small images of a ``folder``.
        synthetic_size: Number of images of the ``synthetic`` dataset.
        synthetic_classes: Classes of the ``synthetic`` dataset.
        mean: Per-channel normalization mean (empty: measured on the train set at start).
        std: Per-channel normalization std (empty: measured with the mean).
        max_side: ``folder`` training views are cut from a cached copy of each image shrunk to this longer side
            (made by the start-up scan; boxes stay in the original's pixels): large photos then cost a small
            decode per epoch. -1: the smallest side that keeps every view at one source pixel per view pixel
            (512 for 224/96 px views at DINO's scales; written into config.yaml at start); 0: never shrink.
    """

    kind: str = "idx"
    root: str = FASHION_MNIST_DIR
    image_size: int = 32
    subset: int = 0
    num_workers: int = 2
    on_bad_image: str = "fail"
    synthetic_size: int = 512
    synthetic_classes: int = 4
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    max_side: int = -1

    def validate(self, global_size: int) -> None:
        """Raise :class:`~pwself.sections.ConfigError` for an unknown kind or a value out of range
        (``global_size``: the views' side, below which ``max_side`` cannot shrink an image)."""
        check_choice("data.kind", self.kind, DATA_KINDS)
        check_choice("data.on_bad_image", self.on_bad_image, ("fail", "skip"))
        check_ranges(self, "data", {**{k: POSITIVE for k in ("image_size", "synthetic_size", "synthetic_classes")},
                                    **{k: NON_NEGATIVE for k in ("subset", "num_workers")}})
        if self.max_side < -1 or 0 < self.max_side < global_size:
            raise ConfigError(f"data.max_side={self.max_side} must be -1 (derived from the views), 0 (never "
                              f"shrink) or at least views.global_size={global_size}")


def build_dataset(kind: str, root: str, split: str = "train", **options: Any) -> Dataset:
    """Open one split of a dataset.

    Args:
        kind: A :data:`DATA_KINDS` name: ``idx``, ``cifar``, ``folder``, ``synthetic`` or one registered.
        root: Dataset directory.
        split: ``train`` or ``test``. For a ``folder``, ``train`` reads ``root/train`` when it exists
            (else ``root``) and ``test`` reads ``root/val`` or ``root/test``.
        options: Fields of :class:`~pwself.data.kinds.OpenOptions` (``image_size``, ``channels``, ``seed``, ...);
            each kind reads those that apply to it.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split {split!r}: use train or test")
    if kind not in DATA_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}: use {', '.join(DATA_KINDS)}")
    return DATA_KINDS[kind].open(str(expand_path(root)), split, OpenOptions(**options))


def open_dataset(data: DataConfig, split: str, channels: int, min_size: int, seed: int = 0) -> Dataset:
    """Open a split of the dataset a ``data`` config section names.

    Args:
        data: The ``data`` section of a run config.
        split: ``train`` or ``test``.
        channels: Channels the backbone takes (``backbone.in_chans``).
        min_size: Smallest accepted image side (the patch size).
        seed: Seed of synthetic data.
    """
    return build_dataset(data.kind, data.root, split, image_size=data.image_size, channels=channels,
                         min_size=min_size, on_bad_image=data.on_bad_image, synthetic_size=data.synthetic_size,
                         synthetic_classes=data.synthetic_classes, seed=seed, max_side=max(data.max_side, 0))


@dataclass(frozen=True)
class TrainingData:
    """The images a run trains on (its ``data.subset``), whether they have labels, and what identifies them (root,
    image count, content fingerprint: a resumed run must see the same)."""

    dataset: Dataset
    labelled: bool
    ident: dict[str, Any]


def open_training_data(data: DataConfig, channels: int, min_size: int, seed: int, local_size: int) -> TrainingData:
    """Open the train split for training and check it against the model before anything else reads it: its
    channels against ``backbone.in_chans`` (``channels``) and, for data decoded in memory, its side against
    ``views.local_size``."""
    dataset = open_dataset(data, "train", channels, min_size, seed)
    image, label = dataset[0]  # decoded once: a folder's first image is a full decode and resize
    if image.shape[0] != channels:
        raise ValueError(f"the data has {image.shape[0]} channel(s) but backbone.in_chans={channels}: set "
                         f"backbone.in_chans={image.shape[0]}")
    if DATA_KINDS[data.kind].in_memory and min(image.shape[-2:]) < local_size:
        raise ValueError(f"images of {tuple(image.shape[-2:])} px are smaller than views.local_size={local_size}: "
                         "use a smaller views.local_size or larger images")
    if data.subset:
        dataset = take_subset(dataset, data.subset)
    ident = {"root": str(expand_path(data.root)), "images": len(dataset), "fingerprint": fingerprint(dataset)}
    return TrainingData(dataset, int(label) >= 0, ident)


def check_data_root(data: DataConfig, run_dir: Path, resume: bool, channels: int, min_size: int, seed: int) -> None:
    """Before the run folder is touched (``--overwrite`` moves it): the data exists, and a folder of images and
    the run folder are not inside one another (a run inside its data would train on its own PNGs next time;
    data inside the run folder would be moved aside with it)."""
    kind = DATA_KINDS[data.kind]
    if not kind.needs_root:
        return
    root = expand_path(data.root)
    if not root.exists() and kind.in_memory:  # the loader's own message says what to install
        open_dataset(data, "train", channels, min_size, seed)
    if not root.exists():
        raise DatasetError(f"data.root={root} does not exist: set data.root to the {data.kind} data's folder")
    if kind.in_memory:
        return
    root, out = root.resolve(), run_dir.resolve()
    if out == root or root in out.parents:
        raise DatasetError(f"--out-dir {run_dir} is inside data.root={data.root}: its files would become training "
                           "images; choose an --out-dir outside the data")
    if out in root.parents and not resume:
        raise DatasetError(f"data.root={data.root} is inside --out-dir {run_dir}: keep the data outside the run "
                           "folder (--overwrite would move it aside with the run)")


def has_heldout_split(data: DataConfig, labelled: bool) -> bool:
    """Whether kNN can run: a labelled training set and a held-out split (folders: ``val/`` or ``test/``)."""
    return labelled and DATA_KINDS[data.kind].has_heldout(data.root)


def scorable(data: DataConfig) -> bool:
    """Whether the data can be scored by kNN and a linear probe without opening it: labelled (class sub-folders
    of ``train/``, no image beside them) with a ``val/`` or ``test/`` split, or a labelled built-in kind."""
    return DATA_KINDS[data.kind].scorable(data.root)


def take_subset(dataset: Dataset, n: int) -> Dataset:
    """The first ``n`` images of a dataset (in-memory datasets stay in memory)."""
    n = min(n, len(dataset))
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[:n], dataset.labels[:n], dataset.classes)
    return torch.utils.data.Subset(dataset, range(n))


def iterate_batches(
    dataset: Dataset, batches: Sequence[Tensor], num_workers: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images uint8 [B, C, H, W], labels [B])`` for each index batch, in order.

    In-memory datasets are sliced directly; others go through a :class:`DataLoader` whose workers
    only decode (views and augmentation run batched on tensors in the main process).
    """
    if isinstance(dataset, TensorImageDataset):
        for idx in batches:
            yield dataset.images[idx], dataset.labels[idx]
        return
    loader = DataLoader(
        dataset,
        batch_sampler=[b.tolist() for b in batches],
        num_workers=num_workers,
        persistent_workers=False,
    )
    try:
        yield from loader
    except Exception as e:  # noqa: BLE001 - re-raised; one line when it came from a worker
        raise (worker_error(e) or e) from None


def channel_stats(dataset: Dataset, max_images: int = 10000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel values in ``[0, 1]`` over up to ``max_images`` images, summed in float64
    so that the rounded statistics (which go into ``config.yaml``) are the same on every CPU."""
    n = len(dataset)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, max_images)]
    if isinstance(dataset, TensorImageDataset):
        x = dataset.images[idx].double() / 255
    else:
        x = torch.stack([dataset[int(i)][0] for i in idx[:1000]]).double() / 255
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _files_digest(h: Any, files: Sequence[Path], root: Path | None) -> None:  # h: a hashlib hash
    """Each file's name (relative to ``root``) and the SHA-256 of its bytes."""
    for f in files:
        name = f.relative_to(root) if root is not None and f.is_relative_to(root) else f
        with open(f, "rb") as stream:
            h.update(f"{name}|{hashlib.file_digest(stream, 'sha256').hexdigest()}\n".encode())


def fingerprint(dataset: Dataset) -> str:
    """What a dataset holds, as a short hash: its pixels and labels (in memory), or every file's path (relative
    to its folder) and content with the labels (folders: the digests of the start-up scan; dense splits: their
    images and masks read here). Caches and resumed runs compare it: contents swapped between classes, a file
    replaced by another of the same size and date, an edited pixel or mask, an added image change it."""
    h = hashlib.sha256()
    base = getattr(dataset, "dataset", dataset)  # a Subset: its base, then which images
    if base is not dataset:
        h.update(repr(dataset.indices).encode())
    if isinstance(base, TensorImageDataset):
        h.update(base.images.numpy().tobytes())
        h.update(base.labels.numpy().tobytes())
    elif hasattr(base, "masks"):  # a dense split: names within the split folder, contents
        _files_digest(h, [*base.images, *base.masks], base.images[0].parent.parent if base.images else None)
    elif hasattr(base, "digests"):  # a scanned folder: each file's content with its name
        root = base.root
        for f, digest in zip(base.files, base.digests):
            h.update(f"{f.relative_to(root) if f.is_relative_to(root) else f}|{digest}\n".encode())
        h.update(repr((base.labels.tolist(), getattr(base, "classes", None))).encode())
    elif hasattr(base, "files"):
        _files_digest(h, base.files, getattr(base, "root", None))
        h.update(repr((base.labels.tolist(), getattr(base, "classes", None))).encode())
    else:
        h.update(f"{type(base).__name__}:{len(base)}".encode())
    return h.hexdigest()[:24]
