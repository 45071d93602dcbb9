"""Datasets that read local files only: IDX (MNIST/Fashion-MNIST), CIFAR pickles, image folders, synthetic.

Every dataset yields ``(image, label)`` with ``image`` a ``uint8`` tensor ``[C, H, W]`` of one common size
and ``label`` an ``int`` (``-1`` when unlabelled). In-memory datasets also expose ``images`` (``[N, C, H, W]``
uint8) and ``labels`` (``[N]`` long) so training can slice whole batches without a loader.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pwself.data.photos import (
    cache_bound,
    content_digest,
    evict_shrunk,
    open_image,
    shrink_image,
    shrunk_path,
    store_shrunk,
)

log = logging.getLogger(__name__)

__all__ = [
    "DatasetError",
    "FASHION_MNIST_DIR",
    "TensorImageDataset",
    "read_idx",
    "load_idx_dataset",
    "load_cifar",
    "ImageFolderDataset",
    "make_synthetic",
    "IMAGE_EXTENSIONS",
    "folder_channels",
    "read_images",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
def folder_channels(root: str | Path, sample: int = 32) -> int | None:
    """3 when any of ``sample`` images spread over a folder is colour (read from the headers, no decode), else 1;
    ``None`` when the folder does not exist or holds no image (the dataset says why when it is opened)."""
    from PIL import Image

    root = expand_path(root)
    if not root.is_dir():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        return None
    for p in files[:: max(1, len(files) // sample)][:sample]:
        try:
            with Image.open(p) as im:
                if im.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return 3
        except OSError:
            continue  # an unreadable file is the scan's to report
    return 1


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DatasetError(ValueError):
    """Bad or missing data; the message names the problem and the fix on one line."""


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor.

    Args:
        images: ``[N, C, H, W]`` uint8.
        labels: ``[N]`` long, ``-1`` for unlabelled.
        classes: Class names, if known.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str] | None = None) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise DatasetError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) == 0:
            raise DatasetError("dataset has no images: point the data path at a non-empty dataset")
        self.images, self.labels, self.classes = images, labels.long(), classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the MNIST format.

    Args:
        path: File path, ``.gz`` or raw.

    Returns:
        The array with the dtype and shape given by the file header.
    """
    path = Path(path)
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path} ({e}): re-install or re-download the dataset") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number): point the data path at MNIST-format files")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise DatasetError(f"{path}: unknown IDX data type 0x{code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: {data.size} values for shape {shape}; re-download it")
    return data.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).exists():
            return root / name
    return None


def load_idx_dataset(root: str | Path, split: str = "train") -> TensorImageDataset:
    """MNIST / Fashion-MNIST from ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``root``.

    Args:
        root: Directory holding the IDX files (default for Fashion-MNIST: the Debian package's).
        split: ``train`` or ``test``.
    """
    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = _find(root, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        hint = (
            "install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
            if str(root) == FASHION_MNIST_DIR
            else "or set data.root=DIR to the directory holding them"
        )
        raise DatasetError(f"no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] in {root}: {hint}")
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or len(images) != len(labels):
        raise DatasetError(f"{img_path} and {lbl_path} do not match ({images.shape} vs {labels.shape})")
    return TensorImageDataset(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a CIFAR batch cannot execute code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN202 - a class, or the error
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def load_cifar(root: str | Path, split: str = "train") -> TensorImageDataset:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) python batches.

    Args:
        root: ``cifar-10-batches-py`` or ``cifar-100-python`` directory (or its parent).
        split: ``train`` or ``test``.
    """
    root = Path(root)
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (root / sub).is_dir():
            root = root / sub
    if (root / "data_batch_1").exists():
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, key = "batches.meta", "label_names"
    elif (root / "train").exists():
        files, meta, key = [split], "meta", "fine_label_names"
    else:
        raise DatasetError(
            f"no CIFAR batches in {root}: expected data_batch_1..5/test_batch (CIFAR-10) or train/test "
            "(CIFAR-100) from the python version of the dataset; set data.root=DIR to its directory"
        )
    data, labels = [], []
    for name in files:
        path = root / name
        if not path.exists():
            raise DatasetError(f"missing CIFAR batch {path}: the dataset directory is incomplete")
        with open(path, "rb") as f:
            try:
                batch = _CifarUnpickler(f, encoding="bytes").load()
            except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
                raise DatasetError(f"cannot read CIFAR batch {path} ({e}): re-download the dataset") from e
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch.get(b"labels", batch.get(b"fine_labels", [])))
    classes = None
    if (root / meta).exists():
        with open(root / meta, "rb") as f:
            names = _CifarUnpickler(f, encoding="bytes").load().get(key.encode())
        classes = [n.decode() for n in names] if names else None
    return TensorImageDataset(torch.from_numpy(np.concatenate(data)), torch.tensor(labels), classes)


def decode_image(path: Path, size: int, channels: int) -> Tensor:
    """Decode an image file to uint8 ``[channels, size, size]``: shorter side to ``size``, centre crop (the
    evaluation transform; training views are cut from the originals, see :mod:`pwself.data.crops`)."""
    from PIL import Image

    im = open_image(path, channels)
    # Shorter side to `size`, then centre crop: every image gets the same grid of pixels.
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def worker_error(e: BaseException) -> DatasetError | None:
    """A DataLoader worker's error as one line: torch puts the worker's traceback in the message, whose last
    line is the error itself. ``None`` for errors not from a worker."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and "DataLoader worker" in lines[0]:
        return DatasetError(lines[-1].split(": ", 1)[-1])
    return None


def expand_path(path: str | Path) -> Path:
    """``~`` and ``$VARS`` expanded: a shell leaves ``data.root=~/photos`` as it is, so pwself does it."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def _show(path: Path) -> str:
    """A file name fit for a one-line message (quoted when it holds a newline or other control characters)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def cache_root() -> Path:
    if os.environ.get("PWSELF_CACHE_DIR"):
        return Path(os.environ["PWSELF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pwself"


def _decode_check(path: Path, shrink: tuple[int, int] | None) -> tuple[tuple[int, int], str]:
    """Decode the whole file (a truncated JPEG passes a header check but not this): its size and the SHA-256 of
    its bytes (read once for both). With ``shrink`` = ``(channels, max_side)`` a larger image is decoded once
    into its shrunk copy (:mod:`pwself.data.photos`); a copy that cannot be written is not the image's fault."""
    from PIL import Image

    data = path.read_bytes()
    digest = content_digest(data)
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        if shrink and max(size) > shrink[1]:
            small = shrink_image(im, *shrink)
        else:
            im.load()
            small = None
    if small is not None:
        store_shrunk(small, shrunk_path(cache_root(), digest, *shrink))
    return size, digest


def _stamp(p: Path) -> list[int]:
    """What changes whenever a file's bytes may have (:func:`stamp_of` its stat). A scan entry with another stamp
    is decoded and hashed again."""
    return stamp_of(p.stat())


def stamp_of(st: os.stat_result) -> list[int]:
    """Size, mtime, ctime (set by every write, rename and ``touch -r``; no user sets it) and inode (``cp`` over a
    file). The size stays although a write moves ctime: on a filesystem with coarse timestamps two writes
    within one tick keep both times."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def scan_images(root: Path, files: list[Path], workers: int = 8, shrink: tuple[int, int] | None = None,
                stats: dict | None = None) -> dict[Path, tuple[tuple[int, int], str] | str]:
    """Every file decoded fully, in parallel threads (Pillow decodes without the GIL): its ``((w, h), content
    digest)`` or the decoding error. Results are cached by path and :func:`_stamp` under ``~/.cache/pwself``
    (``PWSELF_CACHE_DIR``), so a restart or the kNN after training does not decode again. ``shrink = (channels,
    max_side)`` also writes the shrunk copy of every larger image (a cached file whose copy is missing is decoded
    again), then keeps the copies under their size bound.

    One process scans a folder at a time (a lock in the cache): the ranks of a node started together scan
    once, the others wait and read the result. ``stats["decoded"]`` counts the files this call decoded."""
    cache_dir = cache_root() / "scans"
    name = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:20]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(cache_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        lock = None  # a read-only cache: scan without it
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        stats = {} if stats is None else stats
        out = _scan_locked(cache_dir / f"{name}.json", files, workers, shrink, stats)
    finally:
        if lock is not None:
            os.close(lock)
    if shrink and stats["decoded"]:  # only a scan that wrote copies can have grown the cache
        current = {shrunk_path(cache_root(), res[1], *shrink) for res in out.values() if not isinstance(res, str)}
        removed, freed = evict_shrunk(cache_root(), cache_bound(), keep=current)
        if removed:
            log.info("removed %d older shrunk copies (%.1f GB) to keep %s under PWSELF_CACHE_MAX_GB", removed,
                     freed / 1e9, cache_root() / "shrunk")
    return out


def _scan_locked(cache_file: Path, files: list[Path], workers: int, shrink: tuple[int, int] | None,
                 stats: dict | None) -> dict[Path, tuple[tuple[int, int], str] | str]:
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    out: dict[Path, tuple[tuple[int, int], str] | str] = {}
    todo, stamps = [], {}
    for p in files:
        stamps[p] = _stamp(p)
        hit = cache.get(str(p))
        if hit and len(hit) == 3 and hit[0] == stamps[p] and not _copy_missing(hit, shrink):
            out[p] = hit[1] if isinstance(hit[1], str) else (tuple(hit[1]), hit[2])
        else:
            todo.append(p)

    unread: set[Path] = set()  # read errors (permissions, a lost mount): checked again next time, not stored

    def check(p: Path) -> tuple[tuple[int, int], str] | str:
        try:
            return _decode_check(p, shrink)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            if isinstance(e, OSError) and e.errno is not None:
                unread.add(p)
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")

    with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
        for p, res in zip(todo, pool.map(check, todo)):
            out[p] = res
    if stats is not None:
        stats["decoded"] = len(todo)
    if todo:
        try:
            cache.update({str(p): [stamps[p], out[p], None] if isinstance(out[p], str) else
                          [stamps[p], list(out[p][0]), out[p][1]] for p in files if p not in unread})
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(cache_file)
        except OSError:
            log.debug("cannot write the scan cache %s", cache_file)
    return out


def _copy_missing(hit: list, shrink: tuple[int, int] | None) -> bool:
    """Whether a scan entry is a readable image larger than the bound that has no shrunk copy yet."""
    size, digest = hit[1], hit[2]
    return bool(shrink) and isinstance(size, list) and max(size) > shrink[1] and \
        not shrunk_path(cache_root(), digest, *shrink).exists()


class ImageFolderDataset(Dataset):
    """Images found recursively under a folder, decoded with Pillow and resized to ``size x size``.

    Labels come from the first-level sub-folders when images live in them (sorted names -> 0..C-1);
    images directly under ``root`` make the dataset unlabelled (label ``-1``). The constructor decodes every
    file fully (:func:`scan_images`: parallel, cached), so a corrupt, truncated or tiny image fails before
    training, not an hour into it.

    Args:
        root: Folder to scan.
        size: Side the images are resized (shorter side) and centre-cropped to.
        channels: 1 (grayscale) or 3 (RGB).
        min_size: Smallest accepted side in pixels of a source image.
        on_bad_image: ``fail`` (stop, naming the file) or ``skip`` (leave it out and count it).
        max_side: The scan writes a shrunk copy of every image with a longer side above this, for training
            views (:mod:`pwself.data.photos`); 0: none.
        classes: The training split's class names: an evaluation split numbers its labels by them (a class it
            lacks is said once; a class the training split lacks is refused).
    """

    def __init__(
        self,
        root: str | Path,
        size: int,
        channels: int = 3,
        min_size: int = 8,
        on_bad_image: str = "fail",
        max_side: int = 0,
        classes: list[str] | None = None,
    ) -> None:
        self.root = expand_path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder {_show(self.root)} does not exist: set data.root=DIR to an existing "
                               "folder")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DatasetError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}: check the path or the file types"
            )
        self.skipped: list[Path] = []
        self.on_bad_image = on_bad_image
        good = []
        self.max_side, self.cache_dir = max_side, cache_root()
        shrink = (channels, max_side) if max_side > 0 else None
        digests = {}
        scanned = scan_images(self.root, files, shrink=shrink)
        for p in files:  # in name order: the scan answers cached files first
            res = scanned[p]
            if not isinstance(res, str):
                res, digests[p] = res
            if isinstance(res, str):
                problem = (f"corrupt or unreadable image {_show(p)} ({res}): delete it or skip such files with "
                           "data.on_bad_image=skip")
            elif min(res) < min_size:
                problem = (f"image {_show(p)} is {res[0]}x{res[1]} px, smaller than {min_size} px: remove or enlarge "
                           "it, or skip such files with data.on_bad_image=skip")
            else:
                good.append(p)
                continue
            if on_bad_image != "skip":
                raise DatasetError(problem)
            self._report_skip(p)
        if not good:
            raise DatasetError(f"every image under {self.root} is unreadable: check the files")
        self.files = good
        self.digests = [digests[p] for p in good]  # the content of each file, as the scan read it
        rel_parents = {p.relative_to(self.root).parts[0] for p in good if len(p.relative_to(self.root).parts) > 1}
        labelled = all(len(p.relative_to(self.root).parts) > 1 for p in good)
        self.classes = (_align_classes(self.root, sorted(rel_parents), classes) if classes else sorted(rel_parents)) \
            if labelled else None
        index = {c: i for i, c in enumerate(self.classes or [])}
        self.labels = torch.tensor(
            [index[p.relative_to(self.root).parts[0]] if labelled else -1 for p in good], dtype=torch.long
        )
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        # A file can pass the header check and still fail to decode (truncated data). In skip mode the
        # next readable image stands in, so batches keep their size; the file is reported once.
        for k in range(len(self.files)):
            j = (i + k) % len(self.files)
            try:
                return decode_image(self.files[j], self.size, self.channels), int(self.labels[j])
            except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
                if self.on_bad_image != "skip":
                    raise DatasetError(
                        f"corrupt or unreadable image {_show(self.files[j])} ({type(e).__name__}): delete it or skip "
                        "such files with data.on_bad_image=skip"
                    ) from e
                self._report_skip(self.files[j])
        raise DatasetError(f"every image under {self.root} is unreadable: check the files")

    def _report_skip(self, path: Path) -> None:
        if path not in self.skipped:
            self.skipped.append(path)
            log.warning("skipping unreadable image %s", _show(path))


def _align_classes(root: Path, found: list[str], train: list[str]) -> list[str]:
    """The training split's class list for an evaluation split holding ``found``: labels keep the training
    split's numbers, whatever classes this split lacks."""
    extra = sorted(set(found) - set(train))
    if extra:
        raise DatasetError(f"{_show(root)} holds class folder(s) {', '.join(extra)} that the training split lacks: "
                           "a kNN bank cannot vote for them; remove them or add them to the training split")
    missing = sorted(set(train) - set(found))
    if missing:
        log.warning("%s has no image of class(es) %s of the training split: evaluated on the others", _show(root),
                    ", ".join(missing))
    return list(train)


def class_names(root: Path) -> list[str]:
    """The class names a folder's images give (its first-level sub-folders holding images), sorted."""
    return sorted({p.relative_to(root).parts[0] for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and len(p.relative_to(root).parts) > 1})


def make_synthetic(
    n: int = 256, size: int = 16, channels: int = 1, n_classes: int = 4, seed: int = 0
) -> TensorImageDataset:
    """Small labelled images with class-dependent structure, for tests and smoke runs.

    Class ``k`` is a grating of orientation ``k * pi / n_classes`` with random phase, frequency jitter,
    contrast and noise, so classes are learnable but not identical images. Computed in float64: float32 ``sin``
    rounds differently on other CPUs, which would flip pixels and make the same seed other data there.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes
    axis = torch.arange(size, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    theta = labels.double() * torch.pi / n_classes
    freq = 2 * torch.pi / size * (2 + torch.rand(n, generator=g).double())
    phase = 2 * torch.pi * torch.rand(n, generator=g).double()
    proj = torch.cos(theta)[:, None, None] * xx + torch.sin(theta)[:, None, None] * yy
    img = 0.5 + 0.4 * torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    img = img[:, None].expand(n, channels, size, size).clone()
    if channels == 3:
        tint = 0.7 + 0.3 * torch.rand(n, 3, 1, 1, generator=g).double()
        img = img * tint
    img = (img + 0.05 * torch.randn(img.shape, generator=g).double()).clamp(0, 1)
    return TensorImageDataset((img * 255).round().to(torch.uint8), labels)


def read_images(paths: list[str], size: int, channels: int) -> list[Tensor]:
    """Image files as float tensors in [0, 1], resized to ``size`` (0: each at its own resolution); a missing or
    unreadable file is one line naming it."""
    def full(path: Path) -> torch.Tensor:  # the original, at its own resolution
        arr = torch.from_numpy(np.asarray(open_image(path, channels), dtype=np.uint8).copy())
        return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise DatasetError(f"image {p} does not exist: check the path")
        try:
            out.append((full(Path(p)) if size == 0 else decode_image(Path(p), size, channels)).float() / 255)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            raise DatasetError(f"cannot read image {p} ({type(e).__name__}): is it a valid image file?") from e
    return out
