"""Large photos: training views cut from the scan's shrunk copy equal the views cut from the original (same
boxes and matches, pixels within resampling tolerance), the copy follows the file's content, opting out keeps
the old path exactly, and ranks started together scan a folder once."""

import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from pwself.config import ConfigError, load_config, resolve_max_side
from pwself.data.crops import FolderMultiCrop, cut_views, sample_seed
from pwself.data.datasets import ImageFolderDataset, scan_images
from pwself.data.photos import auto_max_side, content_digest, open_image, shrunk_path, write_synthetic_photo
from pwself.matching import match_views
from pwself.views import ViewConfig

VIT_S = ViewConfig(2, 8, 224, 96, (0.4, 1.0), (0.05, 0.4), 0.5)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PWSELF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_synthetic_photo(folder / "a.jpg", 1600, 1200, seed=0)
    write_synthetic_photo(folder / "b.jpg", 1600, 1200, seed=1, orientation=6)  # stored sideways
    write_synthetic_photo(folder / "small.jpg", 400, 300, seed=2)  # below the bound: read as it is
    return folder


def test_the_default_bound_keeps_every_view_at_one_source_pixel_per_view_pixel():
    assert auto_max_side([(224, 0.4), (96, 0.05)]) == 512  # ViT-S/16 at DINO's scales: 96 / sqrt(0.0375) = 496
    assert auto_max_side([(28, 0.4), (16, 0.05)]) == 256  # never below 256
    cfg = resolve_max_side(load_config(None, ["data.kind=folder", "views.global_size=224", "views.local_size=96",
                                              "backbone.patch_size=16"]))
    assert cfg.data.max_side == 512
    assert resolve_max_side(load_config(None, [])).data.max_side == 0  # in-memory data: nothing to shrink
    with pytest.raises(ConfigError, match="data.max_side=100 must be -1 .* or at least views.global_size=224"):
        load_config(None, ["views.global_size=224", "views.local_size=96", "backbone.patch_size=16",
                           "data.max_side=100"])


def copy_of(cache, f):
    """Where the shrunk copy of ``f``'s current content lives."""
    return shrunk_path(cache, content_digest(f.read_bytes()), 3, 512)


def test_views_from_the_shrunk_copy_equal_views_from_the_original(photos, cache):
    dataset = ImageFolderDataset(photos, 32, 3, max_side=512)
    assert dataset.files == sorted(photos.iterdir())
    for f in dataset.files[:2]:
        assert copy_of(cache, f).exists()  # written by the start-up scan
    assert not copy_of(cache, dataset.files[2]).exists()
    fast = FolderMultiCrop(dataset.files, 3, VIT_S, seed=0, max_side=512, cache_dir=cache, digests=dataset.digests)
    full = FolderMultiCrop(dataset.files, 3, VIT_S, seed=0, max_side=0)
    grids = [(14, 14)] * 2 + [(6, 6)] * 8
    pairs = [(i, j) for i in range(2) for j in range(10) if i != j]
    for index in range(3):
        for epoch in range(2):
            (c_fast, b_fast, f_fast), (c_full, b_full, f_full) = fast[index, epoch], full[index, epoch]
            assert torch.equal(b_fast, b_full) and torch.equal(f_fast, f_full)
            if index == 1:  # boxes in the original's oriented pixels (portrait: 1200 wide, 1600 high)
                assert b_full[:, 2].max() <= 1200 and b_full[:, 3].max() <= 1600 and b_full[:, 3].max() > 1200
            m_fast = match_views(b_fast[:, None], f_fast[:, None], grids, pairs)
            m_full = match_views(b_full[:, None], f_full[:, None], grids, pairs)
            assert torch.equal(m_fast.teacher_token, m_full.teacher_token)
            assert torch.equal(m_fast.student_token, m_full.student_token)
            for a, b in zip(c_fast, c_full):
                mad = (a.float() - b.float()).abs().mean()
                assert mad < 2, (index, epoch, float(mad))  # grey levels


def test_opting_out_cuts_from_the_original_exactly_as_before(photos, cache):
    dataset = ImageFolderDataset(photos, 32, 3, max_side=0)
    assert not (cache / "shrunk").exists()
    crops = FolderMultiCrop(dataset.files, 3, VIT_S, seed=0, max_side=0)
    for index in range(3):
        got = crops[index, 0]
        generator = torch.Generator().manual_seed(sample_seed(0, 0, index))
        want = cut_views(open_image(dataset.files[index], 3), VIT_S, generator)
        assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_the_copy_follows_the_files_content(photos, cache):
    dataset = ImageFolderDataset(photos, 32, 3, max_side=512)
    f = photos / "a.jpg"
    old = copy_of(cache, f)
    crops = FolderMultiCrop([f], 3, VIT_S, seed=0, max_side=512, cache_dir=cache, digests=dataset.digests[:1])
    before = crops[0, 0][0][0]
    time.sleep(0.01)
    write_synthetic_photo(f, 1600, 1200, seed=7)  # replaced in place: new content, size or mtime
    os.utime(f, ns=(time.time_ns(), time.time_ns()))
    stats = {}
    dataset = ImageFolderDataset(photos, 32, 3, max_side=512)  # what a new run does first: it sees the new file
    scan_images(photos, sorted(photos.iterdir()), shrink=(3, 512), stats=stats)
    assert stats["decoded"] == 0  # the dataset above re-scanned the changed file already
    new = copy_of(cache, f)
    assert new != old and new.exists()
    crops = FolderMultiCrop([f], 3, VIT_S, seed=0, max_side=512, cache_dir=cache, digests=dataset.digests[:1])
    after = crops[0, 0][0][0]
    full = FolderMultiCrop([f], 3, VIT_S, seed=0, max_side=0)[0, 0][0][0]
    assert (after.float() - full.float()).abs().mean() < 2 < (before.float() - full.float()).abs().mean()


def test_a_missing_copy_is_made_again_and_a_truncated_photo_is_still_caught(photos, cache):
    from pwself.data import DatasetError

    ImageFolderDataset(photos, 32, 3, max_side=512)
    copy = copy_of(cache, photos / "a.jpg")
    copy.unlink()
    stats = {}
    scan_images(photos, sorted(photos.iterdir()), shrink=(3, 512), stats=stats)
    assert stats["decoded"] == 1 and copy.exists()
    data = (photos / "b.jpg").read_bytes()
    (photos / "b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="b.jpg"):
        ImageFolderDataset(photos, 32, 3, max_side=512)


def _scan_in_child(folder, cache, out):
    os.environ["PWSELF_CACHE_DIR"] = str(cache)
    stats = {}
    scan_images(folder, sorted(folder.iterdir()), workers=1, shrink=(3, 512), stats=stats)
    out.put(stats["decoded"])


def test_ranks_started_together_scan_and_shrink_once(photos, cache):
    """Two processes on one node (torchrun ranks) scan the same folder at once: the lock makes one decode
    every file and the other read its result."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_scan_in_child, args=(photos, cache, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(out.get(timeout=5) for _ in procs) == [0, 3]
    assert len(list((cache / "shrunk").glob("*.jpg"))) == 2


@pytest.mark.slow
def test_a_folder_of_large_photos_trains_and_records_its_bound(tmp_path, cache):
    from pwself.cli import main

    folder = tmp_path / "train"
    folder.mkdir()
    for k in range(8):
        write_synthetic_photo(folder / f"p{k}.jpg", 1200, 900, seed=k, orientation=6 if k % 3 == 0 else 1)
    out = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(out), "--epochs", "1", "--batch-size", "4", "--no-progress",
                 "data.kind=folder", f"data.root={folder}", "backbone.in_chans=3", "views.global_size=32",
                 "views.local_size=16", "backbone.patch_size=8", "backbone.embed_dim=32", "backbone.depth=1",
                 "backbone.num_heads=2", "head.out_dim=16", "head.hidden_dim=32", "head.bottleneck_dim=16",
                 "data.num_workers=0", "eval.knn_at_end=false", "eval.knn_floors=false"]) == 0
    assert "max_side: 256" in (out / "config.yaml").read_text()
    assert len(list((cache / "shrunk").glob("*.jpg"))) == 8
    assert np.isfinite([float(line.split('"loss": ')[1].split(",")[0])
                        for line in (out / "metrics.jsonl").read_text().splitlines()]).all()
