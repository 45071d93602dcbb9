"""Data kinds (``data.kind``): each is one :class:`DataKind` that says how its splits open and what the rest of
pwself needs to know about it (channels, whether it is decoded in memory, whether it has a labelled held-out
split), listed once in :data:`DATA_KINDS` (:func:`register_data_kind` from outside the package).

The config (channels from the data, the shrink bound), training (where views are cut, what is checked before
step 1), evaluation and export ask the kind, never its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from pwself.data.datasets import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageFolderDataset,
    class_names,
    expand_path,
    folder_channels,
    load_cifar,
    load_idx_dataset,
    make_synthetic,
)

__all__ = ["DataKind", "OpenOptions", "DATA_KINDS", "register_data_kind"]


@dataclass(frozen=True)
class OpenOptions:
    """What opening a split may use besides the root (each kind reads what applies to it).

    Attributes:
        image_size: Side folder images are resized to; the synthetic image side.
        channels: Channels the backbone takes (folders and synthetic data are read with as many).
        min_size: Smallest accepted source image side (folders).
        on_bad_image: ``fail`` or ``skip`` (folders).
        synthetic_size, synthetic_classes: Images (the test split has a quarter as many) and classes of synthetic
            data.
        seed: Seed of generated data (the test split uses ``seed + 1``).
        max_side: Folders' train split: the scan also writes shrunk copies for training views (0: none).
    """

    image_size: int = 32
    channels: int = 3
    min_size: int = 8
    on_bad_image: str = "fail"
    synthetic_size: int = 512
    synthetic_classes: int = 4
    seed: int = 0
    max_side: int = 0


@dataclass(frozen=True)
class DataKind:
    """One kind of data.

    Attributes:
        name: Its ``data.kind``.
        open: ``(root, split, options) -> Dataset`` of ``(uint8 [C, H, W] image, label)`` (label -1: unlabelled);
            ``split`` is ``train`` or ``test``.
        channels: The channels of its images: a number, or ``root -> channels`` read from the files (``None``: not
            known yet, e.g. a folder that does not exist).
        in_memory: Decoded whole into memory (views are cut from the tensors); ``False``: files that worker
            processes decode for every view (and that the photo cache can shrink).
        needs_root: Whether ``data.root`` must exist (generated data needs none).
        heldout: ``root -> bool``: whether a held-out split exists, judged from the files (``None``: the kind
            always has its test split).
        labelled: ``root -> bool``: whether the images have labels, judged without opening them (``None``: they
            have).
        hub_dataset: The Hugging Face dataset id an exported model's card names (``None``: none).

    Example:
        Generated RGB noise as a data kind: registered, ``data.kind`` accepts it and a run takes its channels.

        >>> import torch, pwself
        >>> from pwself.data import TensorImageDataset
        >>> def noise(root, split, options):
        ...     g = torch.Generator().manual_seed(options.seed + (split == "test"))
        ...     images = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8)
        ...     return TensorImageDataset(images, torch.arange(8) % 2)
        >>> pwself.register_data_kind(pwself.DataKind("noise", noise, channels=3, needs_root=False))
        >>> pwself.load_config(None, ["data.kind=noise"]).backbone.in_chans
        3
        >>> _ = pwself.DATA_KINDS.pop("noise")
    """

    name: str
    open: Callable[[str, str, OpenOptions], Dataset]
    channels: int | Callable[[Path], int | None]
    in_memory: bool = True
    needs_root: bool = True
    heldout: Callable[[Path], bool] | None = None
    labelled: Callable[[Path], bool] | None = None
    hub_dataset: str | None = None

    def channels_at(self, root: str | Path) -> int | None:
        """The channels of this kind's images at ``root``."""
        return self.channels(expand_path(root)) if callable(self.channels) else self.channels

    def has_heldout(self, root: str | Path) -> bool:
        return self.heldout is None or self.heldout(expand_path(root))

    def scorable(self, root: str | Path) -> bool:
        """Whether kNN and a linear probe can score it: labelled, with a held-out split (judged from the files)."""
        return (self.labelled is None or self.labelled(expand_path(root))) and self.has_heldout(root)


def _train_folder(base: Path) -> Path:
    return base / "train" if (base / "train").is_dir() else base


def _open_folder(root: str, split: str, o: OpenOptions) -> Dataset:
    base = Path(root)
    if split == "train":
        folder = _train_folder(base)
    else:
        found = [c for c in (base / "val", base / "test") if c.is_dir()]
        if not found:
            raise DatasetError(f"no {base}/val or {base}/test folder: evaluation needs a labelled held-out split there")
        folder = found[0]
    train_dir = _train_folder(base)
    train_classes = None if split == "train" else [c for c in class_names(train_dir) if train_dir != base
                                                     or c not in ("val", "test")]
    return ImageFolderDataset(folder, o.image_size, o.channels, o.min_size, o.on_bad_image,
                              o.max_side if split == "train" else 0, train_classes or None)


def _folder_heldout(base: Path) -> bool:
    return any((base / name).is_dir() for name in ("val", "test"))


def _folder_labelled(base: Path) -> bool:
    """Class sub-folders of ``train/`` (or the root), no image beside them."""
    train = _train_folder(base)
    if not train.is_dir():
        return True  # the loader names a missing folder in its own words
    entries = list(train.iterdir())
    return any(p.is_dir() for p in entries) and not any(
        p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in entries)


def _open_synthetic(root: str, split: str, o: OpenOptions) -> Dataset:
    n = o.synthetic_size if split == "train" else max(o.synthetic_size // 4, o.synthetic_classes)
    return make_synthetic(n, o.image_size, o.channels, o.synthetic_classes, o.seed if split == "train" else o.seed + 1)


DATA_KINDS: dict[str, DataKind] = {k.name: k for k in (
    DataKind("idx", lambda root, split, o: load_idx_dataset(root, split), 1, hub_dataset="fashion_mnist"),
    DataKind("cifar", lambda root, split, o: load_cifar(root, split), 3, hub_dataset="cifar10"),
    DataKind("folder", _open_folder, lambda root: folder_channels(_train_folder(root)), in_memory=False,
             heldout=_folder_heldout, labelled=_folder_labelled),
    DataKind("synthetic", _open_synthetic, 1, needs_root=False),
)}
"""Every data kind by name (``data.kind``)."""


def register_data_kind(kind: DataKind) -> None:
    """Add a data kind defined outside the package: what its line in :data:`DATA_KINDS` does. ``data.kind`` accepts
    it from then on, with the channels, held-out split and memory rule it declares."""
    DATA_KINDS[kind.name] = kind
