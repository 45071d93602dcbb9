"""Dense probe and scene dataset: IoU against a numpy reference, a probe that must be perfect and one that
must be at chance, the scene generator's determinism and split separation, and the CLI with bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pwself.cli import main
from pwself.data import DatasetError
from pwself.data.dense import dense_classes, open_dense
from pwself.data.scenes import SceneSpec, make_scenes
from pwself.eval.dense import DenseFeatures, confusion_matrix, dense_probe, pixel_encoder, segmentation_scores


def numpy_miou(pred, gt, n_classes, ignore=255):
    """mmsegmentation's ``total_area_to_metrics``, written out: IoU per class over all pixels, NaN when a
    class is in neither the ground truth nor the predictions, mean over the rest."""
    keep = gt != ignore
    p, g = pred[keep], gt[keep]
    ious = []
    for c in range(n_classes):
        inter = np.sum((p == c) & (g == c))
        union = np.sum(p == c) + np.sum(g == c) - inter
        ious.append(np.nan if union == 0 else inter / union)
    return 100 * np.nanmean(ious), 100 * np.sum(p == g) / len(g), ious


def test_iou_matches_numpy_reference_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(3, 9, 11))  # classes 0..3 in the ground truth; 4 never; 5 only predicted
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, 4, size=gt.shape)
    pred[0, 0, :3] = 5
    scores = segmentation_scores(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), 6), list("abcdef"))
    miou, acc, ious = numpy_miou(pred, gt, 6)
    assert scores["miou"] == pytest.approx(miou, rel=1e-12)
    assert scores["pixel_acc"] == pytest.approx(acc, rel=1e-12)
    assert scores["per_class_iou"]["e"] is None  # in neither: out of the mean
    assert scores["per_class_iou"]["f"] == 0.0  # predicted but absent from the ground truth: counts as 0
    for name, ref in zip("abcd", ious):
        assert scores["per_class_iou"][name] == pytest.approx(100 * ref, abs=1e-4)


def _stripes(n, grid, patch, n_classes, seed, ignore_share=0.1):
    """Tokens that are the one-hot class of their column of patches, and masks drawn from them (255 here and
    there). Columns only: bilinear upsampling mixes a pixel with at most one other column, the smaller share."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.randint(0, n_classes, (n, grid), generator=g)
    tokens = torch.nn.functional.one_hot(cols, n_classes).float()[:, None].expand(n, grid, grid, n_classes)
    masks = cols.repeat_interleave(patch, 1)[:, None].expand(n, grid * patch, grid * patch).clone()
    masks[torch.rand(masks.shape, generator=g) < ignore_share] = 255
    return DenseFeatures(tokens.contiguous(), list(masks))


def test_probe_is_perfect_when_tokens_carry_the_label():
    names = ["bg", "a", "b", "c"]
    res = dense_probe(_stripes(200, 4, 4, 4, 0), _stripes(50, 4, 4, 4, 1), names, epochs=15)
    assert res["miou"] == 100.0 and res["pixel_acc"] == 100.0
    assert len(res["grid"]) == 9 and res["best"]["val_miou"] == 100.0


def test_probe_is_at_chance_when_train_labels_are_shuffled():
    names = ["bg", "a", "b", "c"]
    train = _stripes(200, 4, 4, 4, 0)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(5))
    shuffled = DenseFeatures(train.tokens, [train.masks[i] for i in perm])
    res = dense_probe(shuffled, _stripes(100, 4, 4, 4, 1), names, epochs=15)
    assert res["pixel_acc"] < 40  # chance is 25 for 4 balanced classes; perfect is 100
    assert res["miou"] < 25


def test_pixel_encoder_puts_each_patch_on_its_grid_cell():
    x = torch.arange(2 * 1 * 8 * 12, dtype=torch.float).view(2, 1, 8, 12)
    tok = pixel_encoder(4)(x)
    assert tok.shape == (2, 2, 3, 16)
    assert torch.equal(tok[1, 1, 2], x[1, 0, 4:8, 8:12].flatten())


def _read_split(out, split):
    files = sorted((out / split / "images").iterdir())
    return [(np.asarray(Image.open(f)), np.asarray(Image.open(out / split / "masks" / f.name))) for f in files]


def test_scenes_are_seeded_and_splits_do_not_mix(tmp_path, fake_fmnist):
    spec = SceneSpec(size=32, n_train=12, n_test=6, items=(2, 3), item_size=(10, 20), seed=3)
    summary = make_scenes(tmp_path / "a", spec, str(fake_fmnist), progress=False)
    make_scenes(tmp_path / "b", spec, str(fake_fmnist), progress=False)
    a, b = _read_split(tmp_path / "a", "train"), _read_split(tmp_path / "b", "train")
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    train_classes = set(np.unique(np.concatenate([m.ravel() for _, m in a]))) - {0, 255}
    test_classes = set(np.unique(np.concatenate([m.ravel() for _, m in _read_split(tmp_path / "a", "test")])))
    assert train_classes <= {1, 2, 3, 4, 5} and test_classes - {0, 255} <= {6, 7, 8, 9, 10}
    # the item in front owns its pixels: an item's square is bright, so no labelled pixel is dark
    image, mask = a[0]
    assert (image[(mask > 0) & (mask < 255)] >= 16).all() and (image[mask == 0] == 0).all()
    # every scene is also filed under its dominant class, as a folder dataset reads it
    dominant = sorted((tmp_path / "a" / "dominant" / "train").rglob("*.png"))
    assert len(dominant) == 12 and sum(summary["dominant_class_counts"]["train"].values()) == 12
    with pytest.raises(DatasetError, match="--overwrite"):
        make_scenes(tmp_path / "a", spec, str(fake_fmnist), progress=False)


def test_dense_reader_errors_name_the_file_and_the_fix(tmp_path, fake_fmnist):
    out = tmp_path / "s"
    make_scenes(out, SceneSpec(size=28, n_train=4, n_test=2, item_size=(10, 14)), str(fake_fmnist), progress=False)
    (out / "train" / "masks" / "000001.png").unlink()
    with pytest.raises(DatasetError, match="000001.png.*no mask|have no mask"):
        open_dense(out, "train", 1, 28)
    Image.fromarray(np.zeros((20, 28), np.uint8)).save(out / "train" / "masks" / "000001.png")
    with pytest.raises(DatasetError, match="must have its image's size"):
        open_dense(out, "train", 1, 28)[1]
    Image.fromarray(np.full((28, 28), 40, np.uint8)).save(out / "test" / "masks" / "000000.png")
    with pytest.raises(DatasetError, match="holds class 40.*names 11 classes"):
        dense_classes(out, [open_dense(out, "test", 1, 28)])


@pytest.mark.slow
def test_cli_make_scenes_then_eval_dense_with_floor(tmp_path, fake_fmnist, capsys):
    out = tmp_path / "scenes"
    assert main(["make-scenes", str(out), "--size", "28", "--train", "40", "--test", "10", "--item-size", "10,16",
                 "--source", str(fake_fmnist), "--no-progress"]) == 0
    assert main(["eval-dense", "vit_tiny_patch16_224", "--data", str(out), "--size", "28", "--no-progress",
                 "--pixel-floor", "--epochs", "2", "--cache-dir", str(tmp_path / "c"), "--output",
                 str(tmp_path / "d")]) == 2  # patch 16 does not divide 28: refused with the fix
    assert "--size 16" in capsys.readouterr().err
    assert main(["eval-dense", "vit_tiny_patch16_224", "--data", str(out), "--size", "32", "--no-progress",
                 "--pixel-floor", "--epochs", "2", "--cache-dir", str(tmp_path / "c"), "--output",
                 str(tmp_path / "d")]) == 0
    res = json.loads((tmp_path / "d.json").read_text())["dense"]
    assert set(res) == {"vit_tiny_patch16_224 (random init)", "raw pixels (floor)"}
    assert 0 <= res["raw pixels (floor)"]["miou"] <= 100
    assert "| raw pixels (floor) |" in (tmp_path / "d.md").read_text()
    for r in res.values():  # what the numbers were measured with is recorded (issue 28, item 5)
        assert (r["input_size"], r["patch_size"], r["train_images"], r["epochs"]) == (32, 16, 40, 2)
        assert r["best"]["at_grid_edge"] == (r["best"]["lr"] in (r["grid"][0]["lr"], r["grid"][-1]["lr"]))
    assert "lr grid 0.001, 0.003" in (tmp_path / "d.md").read_text() and "| 32 / 16 | 40, 2 |" in (
        tmp_path / "d.md").read_text()
    assert len(list((tmp_path / "c").glob("dense_*.pt"))) == 4  # two encoders x two splits, cached
    assert main(["make-scenes", str(out), "--items", "3", "--source", str(fake_fmnist)]) == 2
    assert "--items 2,4" in capsys.readouterr().err
    assert main(["eval-dense", "vit_tiny_patch16_224", "--data", str(out), "--epochs", "0"]) == 2
    assert "use --epochs 1 or more" in capsys.readouterr().err
    assert main(["make-scenes", str(tmp_path / "other"), "--size", "4", "--source", str(fake_fmnist)]) == 2
    assert "use a size >= 8" in capsys.readouterr().err


def test_probe_grid_grows_past_an_edge_until_the_best_is_inside():
    names = ["bg", "a", "b", "c"]
    train, test = _stripes(120, 4, 4, 4, 0, ignore_share=0.0), _stripes(40, 4, 4, 4, 1)
    noise = torch.randn(train.tokens.shape, generator=torch.Generator().manual_seed(3))
    noisy = DenseFeatures(train.tokens + noise, train.masks)
    # Measured: 10 epochs rise from lr 0.1 to a peak at 3 and fall at 10; the grid (0.1, 0.3) grows to it.
    res = dense_probe(noisy, test, names, lrs=(0.1, 0.3), epochs=10)
    assert [g["lr"] for g in res["grid"]] == [0.1, 0.3, 1.0, 3.0, 10.0]
    assert res["best"]["lr"] == 3.0 and not res["best"]["at_grid_edge"]
    # 2 epochs still rise at lr 30 after the 4 extensions allowed: reported as at the edge.
    short = dense_probe(noisy, test, names, lrs=(0.1, 0.3), epochs=2)
    assert short["grid"][-1]["lr"] == 30.0 and short["best"] == {**short["best"], "lr": 30.0, "at_grid_edge": True}
    # A head does not depend on which heads trained beside it: the grid's values are reproduced alone.
    alone = dense_probe(noisy, test, names, lrs=(3.0,), epochs=10, max_extensions=0)
    assert alone["grid"][0]["val_miou"] == res["best"]["val_miou"]


@pytest.mark.slow
def test_dense_learning_curve_during_training_and_its_plot(tmp_path, fake_fmnist, capsys):
    from test_cli import TINY

    scenes = tmp_path / "scenes"
    assert main(["make-scenes", str(scenes), "--size", "16", "--train", "30", "--test", "10", "--item-size", "6,10",
                 "--source", str(fake_fmnist), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(run), "--batch-size", "32", "--epochs", "2", "--no-progress", *TINY,
                 "eval.dense_every_epochs=1", f"eval.dense_data={scenes}", "eval.knn_at_end=false"]) == 0
    rows = [json.loads(x) for x in (run / "dense_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]  # 96 images / 32: one point per epoch, the last at the end
    assert all(0 <= r["miou"] <= 100 and r["train_s"] > 0 for r in rows) and rows[1]["cpu_s"] > rows[0]["cpu_s"]
    assert all(0 <= r["hbird_miou"] <= 100 for r in rows)  # Hummingbird beside the linear probe, no training
    report = (run / "report.md").read_text()
    assert "| model | step | linear probe | Hummingbird |" in report
    assert f"| {rows[-1]['miou']:.2f} | {rows[-1]['hbird_miou']:.2f} |" in report
    capsys.readouterr()
    assert main(["viz-curves", f"tiny={run}", "--metric", "miou", "--floors", "--output",
                 str(tmp_path / "curve.png")]) == 0
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert [p["top1"] for p in saved["runs"]["tiny"]] == [r["miou"] for r in rows]
    assert set(saved["floors"]) == {"random init", "raw pixels"} and "mIoU after 6 steps" in capsys.readouterr().out
    assert main(["viz-curves", str(run), "--output", str(tmp_path / "k.png")]) == 2  # no kNN points: the hint
    assert main(["pretrain", "--out-dir", str(tmp_path / "r2"), *TINY, "eval.dense_every_epochs=1"]) == 2
    assert "needs eval.dense_data=DIR" in capsys.readouterr().err
