"""Issue 39, caches keyed by what produced them: features by each file's content with its label (a swap between
classes, a same-size same-date replacement, one edited pixel), shrunk photo copies by content, a cache that cannot
be written never makes a good photo "corrupt", the copies are kept under a bound and `pwself cache` shows and
clears them."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pwself.cli import main
from pwself.data.crops import FolderMultiCrop
from pwself.data.datasets import ImageFolderDataset, scan_images
from pwself.data.photos import evict_shrunk, shrunk_path, write_synthetic_photo
from pwself.views import ViewConfig

VIT_S = ViewConfig(2, 2, 224, 96, (0.4, 1.0), (0.05, 0.4), 0.5)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PWSELF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _labelled(root, grey):
    """train/ and val/ with a dark and a light class of 6 same-size PNGs each (one shared mtime)."""
    for split in ("train", "val"):
        for name, level in (("dark", 40), ("light", 210)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(6):
                Image.fromarray(np.full((16, 16), level + k if not grey else level, np.uint8)).save(folder / f"{k}.png")
    for p in root.rglob("*.png"):
        os.utime(p, ns=(10**18, 10**18))


def _knn(tmp_path, model, root, cache_dir):
    out = tmp_path / "knn"
    for f in (f"{out}.json", f"{out}.md"):
        if os.path.exists(f):
            os.remove(f)
    assert main(["eval-knn", model, "--data-kind", "folder", "--data-root", str(root), "--in-chans", "1",
                 "--img-size", "16", "--ks", "1", "--cache-dir", str(cache_dir), "--no-progress", "--output",
                 str(out)]) == 0
    res = json.loads((tmp_path / "knn.json").read_text())["knn"]
    return next(iter(next(iter(res.values())).values()))["1"]["top1"]


@pytest.mark.parametrize("grey", [False, True], ids=["swap-folders", "same-size-same-mtime"])
def test_feature_cache_follows_contents_and_labels(tmp_path, cache, grey):
    """Item 1: swapping what two class folders of val/ hold (names, sizes and dates kept) must change the kNN,
    cached or not."""
    root = tmp_path / "data"
    _labelled(root, grey)
    before = _knn(tmp_path, "vit_tiny_patch16_224", root, tmp_path / "features")
    assert before == 100.0
    for k in range(6):  # swap contents: dark/k.png <-> light/k.png, keeping each name, size and mtime
        a, b = root / "val/dark" / f"{k}.png", root / "val/light" / f"{k}.png"
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
        os.utime(a, ns=(10**18, 10**18))
        os.utime(b, ns=(10**18, 10**18))
    cached = _knn(tmp_path, "vit_tiny_patch16_224", root, tmp_path / "features")
    fresh = _knn(tmp_path, "vit_tiny_patch16_224", root, tmp_path / "fresh")
    assert cached == fresh == 0.0


def _photo_folder(root, n=3):
    root.mkdir(parents=True)
    for k in range(n):
        write_synthetic_photo(root / f"p{k}.jpg", 1200, 900, seed=k)
    return root


def test_a_replaced_photo_of_the_same_size_and_date_gets_its_own_copy(tmp_path, cache):
    """Item 3: `cp` another photo over one, then `touch -r` the old date: views come from the new photo."""
    photos = _photo_folder(tmp_path / "photos")
    ImageFolderDataset(photos, 32, 3, max_side=512)
    target, other = photos / "p0.jpg", tmp_path / "other.jpg"
    Image.fromarray(np.full((900, 1200, 3), 200, np.uint8)).save(other, quality=90)
    st = target.stat()
    data = other.read_bytes()
    with open(target, "r+b") as f:  # the same size: pad or cut the JPEG's tail (decoders stop at its end mark)
        f.write(data[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    dataset = ImageFolderDataset(photos, 32, 3, max_side=512)
    crops = FolderMultiCrop(dataset.files, 3, VIT_S, 0, 512, cache, dataset.digests)
    view = crops[0, 0][0][0].float()
    assert view.mean() > 150  # from the new, light photo (the old copy would give the old photo's ~128)


def test_a_cache_that_cannot_be_written_is_not_a_bad_photo_and_is_not_remembered(tmp_path, cache, caplog,
                                                                                    monkeypatch):
    """Item 12: a read-only (or full) cache folder: every photo still trains (read from the original), one
    warning, no 'corrupt' verdict, nothing stored that outlives the fix."""
    import errno
    import tempfile

    import pwself.data.photos as photos_mod

    photos = _photo_folder(tmp_path / "photos")
    (cache / "shrunk").mkdir(parents=True)
    real = tempfile.mkstemp

    def read_only(*args, **kwargs):  # what a read-only folder answers, even to root (chmod does not stop root)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(photos_mod.tempfile, "mkstemp", read_only)
    photos_mod._warned_dirs.clear()
    dataset = ImageFolderDataset(photos, 32, 3, max_side=512, on_bad_image="skip")
    assert len(dataset.files) == 3 and not dataset.skipped
    warned = [r for r in caplog.records if "cannot write shrunk copies" in r.getMessage()]
    assert len(warned) == 1 and "corrupt" not in caplog.text and "Permission denied" in warned[0].getMessage()
    crops = FolderMultiCrop(dataset.files, 3, VIT_S, 0, 512, cache, dataset.digests)
    assert crops[0, 0][0][0].shape[-1] == 224  # views from the image in memory
    assert not list((cache / "shrunk").iterdir())  # no torn copy, no leftover temporary file
    monkeypatch.setattr(photos_mod.tempfile, "mkstemp", real)  # the disk is fixed
    stats = {}
    scan_images(photos, sorted(photos.iterdir()), shrink=(3, 512), stats=stats)
    assert stats["decoded"] == 3  # the copies were missing: made now that the folder is writable
    assert all(shrunk_path(cache, d, 3, 512).exists() for d in dataset.digests)


def test_a_short_write_leaves_neither_a_torn_copy_nor_a_temporary_file(tmp_path, cache, monkeypatch):
    """Item 10: a full disk mid-write (a short write) is noticed: no copy under the final name, no .tmp."""
    import pwself.data.photos as photos_mod

    real = os.fdopen

    class Short:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            return self.f.write(data[: len(data) // 2])  # what a full disk lets through

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(photos_mod.os, "fdopen", lambda fd, mode: Short(real(fd, mode)))
    photos = _photo_folder(tmp_path / "photos", n=1)
    dataset = ImageFolderDataset(photos, 32, 3, max_side=512)
    assert len(dataset.files) == 1
    assert not list((cache / "shrunk").iterdir())


def test_two_names_of_one_photo_share_one_copy(tmp_path, cache):
    """Item 12: two symlinks to one photo scanned together: one content, one copy, no race on a temporary name."""
    photos = _photo_folder(tmp_path / "photos", n=1)
    for k in range(6):
        (photos / f"link{k}.jpg").symlink_to(photos / "p0.jpg")
    for _ in range(3):
        shutil.rmtree(cache, ignore_errors=True)
        dataset = ImageFolderDataset(photos, 32, 3, max_side=512)
        assert len(set(dataset.digests)) == 1 and len(dataset.files) == 7
        assert [p.name for p in (cache / "shrunk").iterdir()] == [f"{dataset.digests[0]}-3-512.jpg"]


def test_the_copies_stay_under_their_bound_and_pwself_cache_shows_and_clears_them(tmp_path, cache, capsys,
                                                                                   monkeypatch):
    """Item 11: copies of edited photos pile up only to the bound, the current run's copies are kept."""
    photos = _photo_folder(tmp_path / "photos")
    first = ImageFolderDataset(photos, 32, 3, max_side=512).digests
    for k in range(3):  # every photo edited: a second full set of copies
        write_synthetic_photo(photos / f"p{k}.jpg", 1200, 900, seed=10 + k)
    one = (cache / "shrunk" / f"{first[0]}-3-512.jpg").stat().st_size
    monkeypatch.setenv("PWSELF_CACHE_MAX_GB", str(4.5 * one / 1e9))
    second = ImageFolderDataset(photos, 32, 3, max_side=512).digests
    left = {p.name for p in (cache / "shrunk").iterdir()}
    assert {f"{d}-3-512.jpg" for d in second} <= left and len(left) < 6  # the old copies went first
    assert evict_shrunk(cache, 0) == (0, 0)  # 0: no bound
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"{len(left)} shrunk copies" in out and "1 scan records" in out
    assert main(["cache", "--clear"]) == 0
    assert not (cache / "shrunk").exists() and not (cache / "scans").exists()


def test_a_content_change_of_one_pixel_changes_the_dataset_fingerprint(tmp_path, cache):
    from pwself.data import fingerprint

    root = tmp_path / "data"
    _labelled(root, grey=True)
    a = fingerprint(ImageFolderDataset(root / "train", 16, 1))
    p = root / "train/dark/0.png"
    arr = np.array(Image.open(p))
    arr[0, 0] += 1
    Image.fromarray(arr).save(p)
    assert fingerprint(ImageFolderDataset(root / "train", 16, 1)) != a


def test_scores_are_kept_with_the_data_they_were_measured_on(tmp_path):
    """Item 2: a cached score is read back only for the same data (dense_key: both splits' contents)."""
    from pwself.data.dense import dense_key
    from pwself.run.folder import RunFolder

    def scenes(root, level):
        for split in ("train", "test"):
            for d in ("images", "masks"):
                (root / split / d).mkdir(parents=True)
            Image.fromarray(np.full((8, 8), level, np.uint8)).save(root / split / "images" / "a.png")
            Image.fromarray(np.ones((8, 8), np.uint8)).save(root / split / "masks" / "a.png")
        return root

    a, b = scenes(tmp_path / "a", 10), scenes(tmp_path / "b", 20)
    assert dense_key(a) != dense_key(b) and dense_key(a) == dense_key(scenes(tmp_path / "a2", 10))
    calls = []

    def measure(value):
        calls.append(value)
        return {"miou": value}

    run = RunFolder(tmp_path)
    assert run.cached_score("dense", lambda: measure(1.0), key=dense_key(a))["miou"] == 1.0
    assert run.cached_score("dense", lambda: measure(9.0), key=dense_key(a))["miou"] == 1.0  # read back
    assert run.cached_score("dense", lambda: measure(2.0), key=dense_key(b))["miou"] == 2.0  # other data
    assert calls == [1.0, 2.0]


def test_a_split_whose_masks_are_all_ignore_is_one_line_before_any_work(tmp_path, capsys):
    """Item 7: a test split with every mask pixel 255 gave mIoU nan and rc 0."""
    root = tmp_path / "d"
    for split, value in (("train", 1), ("test", 255)):
        for d in ("images", "masks"):
            (root / split / d).mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 99, np.uint8)).save(root / split / "images" / "a.png")
        Image.fromarray(np.full((16, 16), value, np.uint8)).save(root / split / "masks" / "a.png")
    assert main(["eval-dense", "vit_tiny_patch16_224", "--data", str(root), "--cache-dir", "", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "every mask pixel in" in err and "test/masks is 255" in err
