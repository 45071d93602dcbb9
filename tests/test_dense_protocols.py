"""Dense evaluation on a user's own masks (issue 43): photo-size masks scored at a fixed size, the training-free
protocols through the CLI with their floors, and bad masks refused in one line before any work."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pwself.cli import main
from pwself.data.datasets import DatasetError
from pwself.data.dense import dense_classes, open_dense
from pwself.eval.dense import DenseSettings


def _photo_folder(root, sizes=((120, 90), (200, 150), (96, 128)), n_train=6, n_test=3, seed=0):
    """Images of several sizes, each a background (0) with a bright rectangle of class 1 or 2 and an ignored rim."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            cls = 1 + i % 2
            x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
            mask = np.zeros((h, w), np.uint8)
            mask[y0:y0 + h // 2, x0:x0 + w // 2] = cls
            mask[y0, x0:x0 + w // 2] = 255
            image = np.where(mask[..., None] == cls, 200 if cls == 1 else 90, 20).astype(np.uint8).repeat(3, 2)
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.jpg")
            Image.fromarray(mask).save(root / split / "masks" / f"{i:03d}.png")
    (root / "classes.json").write_text(json.dumps(["background", "bright", "dark"]))


def test_masks_are_brought_to_the_evaluation_size_without_new_classes(tmp_path):
    _photo_folder(tmp_path / "d")
    split = open_dense(tmp_path / "d", "train", 3, 32, mask_size=24)
    image, mask = split[1]
    assert image.shape == (3, 32, 32) and mask.shape == (24, 24)
    full = open_dense(tmp_path / "d", "train", 3, 32)[1][1]
    assert full.shape == (150, 200) and set(mask.unique().tolist()) <= set(full.unique().tolist())


def test_a_mask_of_another_size_than_its_image_is_refused_before_any_work(tmp_path):
    _photo_folder(tmp_path / "d")
    Image.fromarray(np.zeros((90, 121), np.uint8)).save(tmp_path / "d" / "test" / "masks" / "000.png")
    splits = [open_dense(tmp_path / "d", s, 3, 32) for s in ("train", "test")]
    with pytest.raises(DatasetError, match=r"000.png is 121x90 but its image is 120x90: a mask must have its image"):
        dense_classes(tmp_path / "d", splits)


def test_dense_settings_name_a_bad_protocol_and_the_fix():
    with pytest.raises(ValueError, match="dense protocols linear,knn: use one or more of linear,hbird,overcluster"):
        DenseSettings(protocols=("linear", "knn"))
    with pytest.raises(ValueError, match="--mask-size -1"):
        DenseSettings(mask_size=-1)


@pytest.mark.slow
def test_eval_dense_runs_every_protocol_on_photo_masks_with_the_floors(tmp_path, capsys):
    """A pwself run evaluated on a folder of photos of three sizes: linear, Hummingbird and overclustering, each
    with the raw-pixel and random-init rows, masks scored at the model's input side, one table per protocol."""
    _photo_folder(tmp_path / "d")
    run = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(run), "--steps", "2", "--batch-size", "8", "--no-progress",
                 "data.kind=synthetic", "data.synthetic_size=16", "backbone.in_chans=3", "views.global_size=32",
                 "views.local_size=16", "backbone.patch_size=8", "backbone.embed_dim=32", "backbone.depth=1",
                 "backbone.num_heads=2", "head.out_dim=16", "eval.knn_at_end=false", "eval.knn_floors=false"]) == 0
    assert main(["eval-dense", str(run), "--data", str(tmp_path / "d"), "--protocols", "linear,hbird,overcluster",
                 "--pixel-floor", "--random-floor", "--epochs", "2", "--no-progress", "--cache-dir", "",
                 "--output", str(tmp_path / "out")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    res = out["dense"]
    assert set(res) == {str(run), "raw pixels (floor)", "random init (same backbone)"}
    ran = out["settings"]["dense"]  # what the numbers were measured with, data folder included
    assert ran["root"] == str(tmp_path / "d") and ran["protocols"] == ["linear", "hbird", "overcluster"]
    for row in res.values():
        assert row["mask_size"] == 32 and row["protocols"] == ["linear", "hbird", "overcluster"]
        assert 0 <= row["miou"] <= 100 and 0 <= row["hbird"]["miou"] <= 100
        assert row["hbird"]["memory"] == 6 * 16 and row["hbird"]["neighbours"] == 30
        assert set(row["overcluster"]) == {"3"}  # K = classes; 100 and 300 exceed the 48 test patches: skipped
        assert set(row["seconds"]) == {"features", "linear", "hbird", "overcluster"}
    md = (tmp_path / "out.md").read_text()
    assert "### Hummingbird in-context retrieval" in md and "### Overclustering" in md
    assert "Masks scored at 32 x 32 px" in md
    # The options reach the protocols: a memory of 4 patches an image, masks scored at 16 px.
    assert main(["eval-dense", str(run), "--data", str(tmp_path / "d"), "--protocols", "hbird", "--hbird-memory",
                 "24", "--mask-size", "16", "--no-progress", "--cache-dir", "", "--output", str(tmp_path / "m")]) == 0
    row = json.loads((tmp_path / "m.json").read_text())["dense"][str(run)]
    assert row["hbird"]["memory"] == 24 and row["mask_size"] == 16 and "miou" not in row  # no linear probe ran
    assert main(["eval-dense", str(run), "--data", str(tmp_path / "d"), "--protocols", "hbird,knn"]) == 2
    assert "use one or more of linear,hbird,overcluster" in capsys.readouterr().err
    assert main(["eval-dense", str(run), "--data", str(tmp_path / "d"), "--hbird-memory", "-5"]) == 2
    assert "--hbird-memory -5: use 0 or more" in capsys.readouterr().err


def test_hummingbird_on_tokens_that_carry_the_class_is_perfect_at_any_mask_size():
    """Tokens equal to their class direction, one class an image (no class border, where bilinear upsampling of
    the retrieved histograms blends neighbours as the reference does): scored against masks of two sizes (the
    patch grid x 4 and x 5), the mIoU is 100."""
    from pwself.eval.incontext import hummingbird

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2])[:, None, None].expand(8, 4, 4)
    tokens = torch.eye(6)[:3][labels] + 0.01 * torch.randn(8, 4, 4, 6, generator=g)
    masks = [labels[i].repeat_interleave(s, 0).repeat_interleave(s, 1) for i, s in zip(range(8), [4, 5] * 4)]
    res = hummingbird(tokens[:6], masks[:6], tokens[6:], masks[6:], ["a", "b", "c"], k=5)
    assert res["miou"] == pytest.approx(100.0)
