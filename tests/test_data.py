"""Local loaders on small files made here: IDX, CIFAR pickles, image folders; bad input errors."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pwself.data import DatasetError, build_dataset, channel_stats
from pwself.data.datasets import ImageFolderDataset, load_idx_dataset, read_idx


def _write_idx(path, arr, code):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(data)


def test_idx_gz_and_raw(tmp_path):
    imgs = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, 0x08)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([2, 0, 1]), 0x08)
    ds = load_idx_dataset(tmp_path, "train")
    assert ds.images.shape == (3, 1, 4, 5) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[1, 0], torch.from_numpy(imgs[1])) and ds.labels.tolist() == [2, 0, 1]


def test_idx_truncated_and_bad_magic(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 10, 4, 4) + b"\x00" * 20)
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"\x89PNG....")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(p)


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="data.root=DIR"):
        load_idx_dataset(tmp_path / "nowhere", "train")
    import pwself.data.datasets as datasets

    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "fm"))
    with pytest.raises(DatasetError, match="sudo apt-get install dataset-fashion-mnist"):
        load_idx_dataset(tmp_path / "fm", "train")


def test_cifar10_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        pickle.dump(batch, open(root / name, "wb"))
    pickle.dump({b"label_names": [b"a", b"b", b"c", b"d"]}, open(root / "batches.meta", "wb"))
    ds = build_dataset("cifar", str(tmp_path), "train")
    assert ds.images.shape == (20, 3, 32, 32) and ds.classes == ["a", "b", "c", "d"]
    assert len(build_dataset("cifar", str(root), "test")) == 4


def test_cifar_pickle_cannot_run_code(tmp_path):
    root = tmp_path / "c"
    root.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pickle.dump({b"data": Evil()}, open(root / "train", "wb"))
    with pytest.raises(DatasetError, match="cannot read CIFAR batch"):
        build_dataset("cifar", str(root), "train")


def _save(path, size=(20, 16), mode="RGB", color=(10, 200, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


def test_image_folder_labels_sizes_and_modes(tmp_path):
    _save(tmp_path / "train" / "cat" / "a.png")
    _save(tmp_path / "train" / "dog" / "b.jpg", size=(40, 50))
    _save(tmp_path / "train" / "dog" / "c.png", mode="L")
    Image.fromarray(np.full((30, 30), 60000, dtype=np.uint16)).save(tmp_path / "train" / "dog" / "d16.png")
    ds = build_dataset("folder", str(tmp_path), "train", image_size=12, channels=3)
    assert len(ds) == 4 and ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 1, 1]
    x, y = ds[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.uint8 and y == 0
    assert tuple(x[:, 6, 6].tolist()) == (10, 200, 30)
    assert ds[3][0].shape == (3, 12, 12)  # 16-bit grayscale decoded
    gray = ImageFolderDataset(tmp_path / "train", 8, channels=1)
    assert gray[0][0].shape == (1, 8, 8)


def test_image_folder_unlabelled(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    ds = ImageFolderDataset(tmp_path, 8)
    assert ds.classes is None and ds.labels.tolist() == [-1, -1]


def test_image_folder_bad_input(tmp_path, caplog):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", 8)
    _save(tmp_path / "f" / "ok.png")
    (tmp_path / "f" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DatasetError, match="corrupt or unreadable image .*bad.png"):
        ImageFolderDataset(tmp_path / "f", 8)
    with caplog.at_level("WARNING", logger="pwself"):
        assert len(ImageFolderDataset(tmp_path / "f", 8, on_bad_image="skip")) == 1
    assert any("skipping unreadable image" in r.message and "bad.png" in r.message for r in caplog.records)
    _save(tmp_path / "g" / "tiny.png", size=(3, 3))
    with pytest.raises(DatasetError, match="smaller than 8 px"):
        ImageFolderDataset(tmp_path / "g", 8, min_size=8)
    with pytest.raises(DatasetError, match="val or .*test"):
        build_dataset("folder", str(tmp_path / "f"), "test")


def test_synthetic_and_channel_stats():
    ds = build_dataset("synthetic", "", "train", image_size=16, channels=3, synthetic_size=64, synthetic_classes=4)
    assert ds.images.shape == (64, 3, 16, 16) and ds.labels.bincount().tolist() == [16] * 4
    mean, std = channel_stats(ds)
    x = ds.images.float() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)
    assert std == pytest.approx(x.std(dim=(0, 2, 3)).tolist(), abs=1e-5)
