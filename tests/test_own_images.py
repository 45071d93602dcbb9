"""A user's own photos: views cut from the full-resolution originals (any size and aspect), unlabelled
folders, paths with ~, and a run resumed exactly with views cut in worker processes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pwself.cli import main
from pwself.data.crops import FolderMultiCrop, collate_views, sample_seed
from pwself.losses import view_pairs
from pwself.matching import match_pair, match_views
from pwself.views import ViewConfig

SIZES = [(500, 375), (300, 600), (64, 64)]
SPEC = ViewConfig(2, 4, 32, 16, (0.4, 1.0), (0.05, 0.4), 0.5)
SMALL = ["backbone.in_chans=3", "views.global_size=32", "views.local_size=16", "views.n_local=2",
         "backbone.patch_size=8", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
         "head.out_dim=16", "head.hidden_dim=32", "head.bottleneck_dim=16", "log_every=1", "eval.knn_floors=false"]


def _photos(root, sizes=SIZES, repeat=1):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(sizes * repeat):
        yy, xx = np.mgrid[0:h, 0:w]  # smooth content, so JPEG keeps it and interpolation is well defined
        arr = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h)) + rng.integers(0, 60)], -1)
        Image.fromarray(arr.astype(np.uint8)).save(root / f"photo{k}.jpg", quality=95)
    return sorted(root.glob("*.jpg"))


def test_views_are_cut_from_the_original_inside_its_own_pixels(tmp_path):
    files = _photos(tmp_path)
    ds = FolderMultiCrop(files, 3, SPEC, seed=0)
    samples = [ds[(i, 0)] for i in range(len(files))]
    for (crops, boxes, flips), path, (w, h) in zip(samples, files, SIZES):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
        assert (boxes[:2, 2] - boxes[:2, 0]).max() > 0.3 * w  # globals span a large part of the original
        original = Image.open(path).convert("RGB")
        for v, (crop, box, flip) in enumerate(zip(crops, boxes.tolist(), flips.tolist())):
            size = SPEC.global_size if v < 2 else SPEC.local_size
            ref = original.resize((size, size), Image.BICUBIC, box=tuple(box))  # done independently
            ref = np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref).astype(float)
            got = crop.permute(1, 2, 0).numpy().astype(float)
            assert crop.shape == (3, size, size) and np.abs(got - ref).mean() < 1.0
    views = collate_views(samples, SPEC.n_global)  # view-major, as the in-memory path gives them
    assert views.global_crops.shape == (2 * 3, 3, 32, 32) and views.local_crops.shape == (4 * 3, 3, 16, 16)
    torch.testing.assert_close(views.global_crops[1 * 3 + 2], samples[2][0][1])
    # Matching on those boxes is the SPEC's matching in original pixels, for every pair and sample.
    grids = [(4, 4)] * 2 + [(2, 2)] * 4
    pairs = view_pairs(2, 6)
    m = match_views(views.boxes, views.flips, grids, pairs)
    for p, (i, j) in enumerate(pairs):
        for b in range(3):
            sel = m.pair_index == p * 3 + b
            expected = match_pair(views.boxes[i, b].tolist(), bool(views.flips[i, b]), grids[i],
                                  views.boxes[j, b].tolist(), bool(views.flips[j, b]), grids[j])
            assert list(zip(m.teacher_token[sel].tolist(), m.student_token[sel].tolist())) == expected


def test_the_crops_of_an_image_depend_on_seed_epoch_and_index_only(tmp_path):
    files = _photos(tmp_path)
    a, b = FolderMultiCrop(files, 3, SPEC, seed=0), FolderMultiCrop(list(reversed(files)), 3, SPEC, seed=0)
    assert torch.equal(a[(0, 3)][1], a[(0, 3)][1])
    assert not torch.equal(a[(0, 3)][1], a[(0, 4)][1])
    assert not torch.equal(a[(0, 3)][1], b[(0, 3)][1]) or files[0] == files[-1]  # index, not worker order
    assert len({sample_seed(s, e, i) for s in range(3) for e in range(50) for i in range(200)}) == 3 * 50 * 200


def test_pretrain_on_an_unlabelled_folder_under_home_with_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    _photos(tmp_path / "photos", repeat=4)
    out = tmp_path / "run"
    argv = ["pretrain", "data.kind=folder", "data.root=~/photos", "--epochs", "1", "--out-dir", str(out),
            "--batch-size", "4", "--no-progress", *SMALL, "data.num_workers=1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "kNN is skipped" in captured.err and "unlabelled" in captured.err
    for name in ("config.yaml", "checkpoint_00000003.pt", "teacher_backbone.safetensors", "report.html"):
        assert (out / name).exists(), name
    assert not (out / "knn.json").exists()
    assert "report:" in captured.out
    # Issue 28, item 3: the report says how the run was made and why kNN is missing.
    page = (out / "report.html").read_text()
    assert "pwself 0.1.0; finished 20" in page and "device cpu; 12 training images (data.kind folder, " in page
    assert "kNN skipped: the data has no labelled held-out split" in page


def test_a_folder_smaller_than_the_default_batch_is_told_the_flag_that_fits(tmp_path, capsys):
    _photos(tmp_path / "photos", repeat=4)  # 12 photos, the default batch is 64
    argv = ["pretrain", "data.kind=folder", f"data.root={tmp_path / 'photos'}", "--epochs", "1",
            "--out-dir", str(tmp_path / "run"), "--no-progress", *SMALL]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "batch_size=64 x 1 process(es) is larger than the dataset (12 images)" in err
    assert "--batch-size 12" in err
    assert main([*argv, "--batch-size", "12", "data.num_workers=1"]) == 0  # the fix it names works as written


def test_the_matches_figure_shows_the_training_photo_not_the_evaluation_crop(tmp_path):
    import types

    from pwself.report import _training_image
    from pwself.viz import draw_matches

    files = _photos(tmp_path)
    photo, label = _training_image(types.SimpleNamespace(files=files), 1, 3, show=256)
    assert label == "training photo photo1.jpg (300x600 px, shown at 128x256)" and photo.shape == (3, 256, 128)
    fig = draw_matches(photo, 8, 32, 16, source=label)
    assert fig.axes[0].get_title().startswith("training photo photo1.jpg (300x600 px, shown at 128x256), crop boxes;")
    assert _training_image(types.SimpleNamespace(), 0, 1) == (None, "")  # idx, cifar, synthetic: the image itself


def test_channels_come_from_the_data_unless_set(tmp_path, caplog):
    """Issue 28, item 2: an RGB folder trained with the defaults is RGB (said in one line), a grey folder grey,
    and a value the user sets wins."""
    import logging

    from pwself.config import load_config

    _photos(tmp_path / "rgb")
    grey = tmp_path / "grey"
    grey.mkdir()
    for k in range(3):
        Image.fromarray(np.full((40, 50), 30 * k, np.uint8)).save(grey / f"g{k}.png")
    with caplog.at_level(logging.INFO, logger="pwself.config"):
        rgb = load_config(None, ["data.kind=folder", f"data.root={tmp_path / 'rgb'}"])
    assert rgb.backbone.in_chans == 3
    assert f"backbone.in_chans=3 from the data (colour images in {tmp_path / 'rgb'})" in caplog.text
    assert load_config(None, ["data.kind=folder", f"data.root={grey}"]).backbone.in_chans == 1
    assert load_config(None, ["data.kind=folder", f"data.root={tmp_path / 'rgb'}",
                              "backbone.in_chans=1"]).backbone.in_chans == 1
    assert load_config(None, ["data.kind=cifar"]).backbone.in_chans == 3
    assert load_config(None, []).backbone.in_chans == 1  # Fashion-MNIST


@pytest.mark.slow
def test_a_folder_run_resumes_exactly_with_views_cut_in_workers(tmp_path):
    from pwself.run.checkpoint import load_checkpoint

    _photos(tmp_path / "photos", repeat=4)
    common = ["pretrain", "data.kind=folder", f"data.root={tmp_path / 'photos'}", "--epochs", "2", "--batch-size",
              "4", "--no-progress", *SMALL, "data.num_workers=2", "eval.knn_at_end=false"]
    assert main([*common, "--out-dir", str(tmp_path / "straight")]) == 0
    resumed = tmp_path / "resumed"
    assert main([*common, "--out-dir", str(resumed)]) == 0
    (resumed / "checkpoint_00000006.pt").unlink()
    (resumed / "checkpoint_last.pt").unlink()
    assert main([*common, "--out-dir", str(resumed), "--resume", "data.num_workers=0"]) == 0  # workers or not
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(resumed)
    for name, value in a["teacher"].items():
        assert torch.equal(value, b["teacher"][name]), name
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["n_match"] > 0 for r in rows)


def test_starting_from_an_export_gives_the_exported_models_forward(tmp_path):
    from test_cli import TINY

    import pwself
    from pwself.config import load_config
    from pwself.step import build_step

    run = tmp_path / "first"
    assert main(["pretrain", "--out-dir", str(run), "--epochs", "1", "--batch-size", "32", "--no-progress", *TINY,
                 "eval.knn_at_end=false", "eval.knn_floors=false"]) == 0
    assert main(["export", str(run), "--format", "folder", str(tmp_path / "model")]) == 0
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = pwself.load(run).forward_features(x)
    for init in (tmp_path / "model", run / "teacher_backbone.safetensors", run):  # folder, file, run folder
        cfg = load_config(None, [t for t in TINY if "=" in t] + [f"backbone.init={init}", "seed=9"])
        step = build_step(cfg, torch.device("cpu"), [0.5], [0.25])
        with torch.no_grad():
            torch.testing.assert_close(step.model.backbone.forward_features(x), ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(step.teacher.backbone.forward_features(x), ref, rtol=0, atol=1e-6)


def test_dino_style_checkpoints_are_mapped_and_position_embeddings_resampled(tmp_path):
    from timm.layers import resample_abs_pos_embed

    from pwself.init_weights import load_backbone_weights
    from pwself.models import BackboneConfig, make_vit
    from pwself.run.checkpoint import CheckpointError

    cfg = BackboneConfig(patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    source = make_vit(cfg, 16)  # a 4x4 grid
    state = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
    state["module.head.mlp.0.weight"] = torch.zeros(3)  # DINO's head: dropped
    torch.save({"teacher": state, "epoch": 3}, tmp_path / "dino_checkpoint.pth")
    target = make_vit(cfg, 32)  # an 8x8 grid: the position embeddings are resampled
    load_backbone_weights(target, tmp_path / "dino_checkpoint.pth")
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    other = make_vit(BackboneConfig(patch_size=8, in_chans=1, embed_dim=32, depth=1, num_heads=2), 16)
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.weight is .* in the file .* backbone.patch_size"):
        load_backbone_weights(other, tmp_path / "dino_checkpoint.pth")
    with pytest.raises(CheckpointError, match="does not exist: pass a local weights file"):
        load_backbone_weights(other, tmp_path / "nothing.pth")


def test_backbone_name_sets_the_sizes_of_a_timm_vit():
    from pwself.config import ConfigError, load_config

    cfg = load_config("vit_small_folder", ["data.root=/nowhere"])
    b = cfg.backbone
    assert (b.patch_size, b.embed_dim, b.depth, b.num_heads, b.mlp_ratio) == (16, 384, 12, 6, 4.0)
    assert (cfg.views.global_size, cfg.views.local_size, cfg.views.n_local, cfg.head.out_dim) == (224, 96, 8, 65536)
    with pytest.raises(ConfigError, match="not a timm model"):
        load_config(None, ["backbone.name=vit_nonexistent"])


def test_a_finished_folder_run_from_before_max_side_is_shown_not_refused(tmp_path, capsys):
    """`pretrain --auto-resume` without --config reads the run's config as the run meant it (one reader,
    run.state.read_run_config): a folder run whose config.yaml predates data.max_side cut its views from the
    originals (0), so it is the same run, not one "differing in data.max_side"."""
    import yaml

    _photos(tmp_path / "photos", repeat=4)
    out = tmp_path / "run"
    argv = ["pretrain", "data.kind=folder", f"data.root={tmp_path / 'photos'}", "--epochs", "1", "--out-dir",
            str(out), "--batch-size", "4", "--no-progress", *SMALL, "data.num_workers=1", "data.max_side=0"]
    assert main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["data"]["max_side"]  # as a run of an older pwself wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    assert main(["pretrain", "--out-dir", str(out), "--auto-resume", "--no-progress"]) == 0
    assert "holds this run, finished at step 3" in capsys.readouterr().out
