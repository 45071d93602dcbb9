"""Evaluation suite: linear probe, copy detection end to end, retrieval files, cache, CLI tables, bad input."""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_cli import TINY

import pwself.eval.source as source_mod
from pwself.cli import main
from pwself.data import DatasetError
from pwself.eval.copydetect import copydetect_map, generate_copydetect_set, read_copydays
from pwself.eval.linear import linear_probe
from pwself.eval.retrieval import load_ground_truth


def _clusters(n, c=4, d=16, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(c, d, generator=torch.Generator().manual_seed(99)), dim=1)
    y = torch.arange(n) % c
    return F.normalize(centers[y] + noise * torch.randn(n, d, generator=g), dim=1), y


def test_linear_probe_separable_100_and_random_labels_chance():
    x, y = _clusters(400)
    xt, yt = _clusters(200, seed=1)
    res = linear_probe(x, y, xt, yt, epochs=10)
    assert res["top1"] == 100.0 and len(res["grid"]) == 16
    assert res["best"]["val_top1"] == max(r["val_top1"] for r in res["grid"])
    rand = linear_probe(x, y[torch.randperm(400, generator=torch.Generator().manual_seed(0))], xt, yt, epochs=10)
    assert rand["top1"] < 45  # chance is 25%
    with pytest.raises(ValueError, match="differ in dimension"):
        linear_probe(x, y, xt[:, :3], yt)


def _image_folder(path, n, size=48, seed=0):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        base = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)  # distinct coarse patterns
        Image.fromarray(base).resize((size, size), Image.NEAREST).save(path / f"im{k:03d}.png")
    return path


def test_copy_detection_with_copy_invariant_features_is_perfect(tmp_path):
    src = _image_folder(tmp_path / "src", 36)
    layout = generate_copydetect_set(src, tmp_path / "cd", n_originals=12, copies_per_original=2,
                                     n_distractors=12, n_whitening=12)
    assert len(layout.originals) == 12 and len(layout.blocks["strong"]) == 24
    assert all(len(p) == 1 for p in layout.positives["strong"])
    rng = np.random.default_rng(0)
    group = lambda p: int(p.name[:4])  # noqa: E731

    def desc(files):  # identical features for an original and its copies, random for the rest
        return np.stack([np.eye(12)[group(p)] + 0.001 * rng.normal(size=12) for p in files])

    database = np.concatenate([desc(layout.originals), rng.normal(size=(12, 12))])
    queries = {"strong": desc(layout.blocks["strong"]), "original": desc(layout.originals)}
    res = copydetect_map(database, queries, layout.positives)
    assert res == {"strong": 1.0, "original": 1.0}
    # Worked example C1: positives at rank 0, rank 3 and outside the top 20 -> 0.375.
    db = np.eye(25)
    q = np.stack([db[0], 0.5 * db[1] + 0.4 * db[2] + 0.3 * db[3] + 0.2 * db[4], db[24] * 0 + db[5]])
    c1 = copydetect_map(db, {"strong": q}, {"strong": [[0], [4], [24]]}, top_k=20)
    assert c1["strong"] == pytest.approx(0.375)


def test_copydays_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="no .*original folder"):
        read_copydays(tmp_path)
    _image_folder(tmp_path / "original", 2)
    (tmp_path / "original" / "im000.png").rename(tmp_path / "original" / "000100.png")
    (tmp_path / "strong").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "strong" / "777701.jpg")
    with pytest.raises(DatasetError, match="no original of the same 4-character prefix"):
        read_copydays(tmp_path)


@pytest.mark.slow
def test_cli_eval_all_protocols_with_checkpoint_and_timm_floor(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(run), "--epochs", "1", "--batch-size", "32", "--no-progress", *TINY,
                 "eval.knn_at_end=false"]) == 0
    src = _image_folder(tmp_path / "src", 30, size=32)
    generate_copydetect_set(src, tmp_path / "cd", n_originals=10, copies_per_original=1, n_distractors=10,
                            n_whitening=10)
    # A retrieval set: 2 queries, 6 database images, JSON ground truth.
    rdir = tmp_path / "ret" / "jpg"
    rdir.mkdir(parents=True)
    for k in range(8):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(rdir / f"r{k}.jpg")
    gnd = {"imlist": [f"r{k}" for k in range(6)], "qimlist": ["r6", "r7"],
           "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 30, 30]},
                   {"easy": [3], "hard": [], "junk": [], "bbx": [5, 5, 25, 35]}]}
    (tmp_path / "ret" / "gnd_toy.json").write_text(json.dumps(gnd))
    out = tmp_path / "res"
    code = main(["eval", str(run), "vit_tiny_patch16_224", "--no-progress", "--cache-dir", str(tmp_path / "c"),
                 "--epochs", "3", "--ks", "10,20", "--copydetect-path", str(tmp_path / "cd"),
                 "--gnd", str(tmp_path / "ret" / "gnd_toy.json"), "--output", str(out)])
    assert code == 0
    res = json.loads(out.with_suffix(".json").read_text())
    names = [str(run), "vit_tiny_patch16_224 (random init)"]
    assert list(res["knn"]["cls"]) == names and list(res["linear"]["cls"]) == names
    for name in names:
        assert 0 <= res["knn"]["cls"][name]["10"]["top1"] <= 100
        cd = res["copydetect"][name]
        assert 0 <= cd["strong"] <= 1 and cd["original"] > 0.99  # originals find themselves
        assert set(res["retrieval"][name]) >= {"E", "M", "crop_queries"}
    md = out.with_suffix(".md").read_text()
    assert "### Copy detection" in md and "### Linear probe" in md and "random init" in md


def test_feature_cache_reuses_and_keys_on_pooling(tmp_path, monkeypatch):
    from pwself.data import make_synthetic

    src = source_mod.open_source("vit_tiny_patch16_224", in_chans=1, img_size=16)
    ds = make_synthetic(8, 16, 1)
    calls = []
    real = source_mod.extract_features
    monkeypatch.setattr(source_mod, "extract_features", lambda *a, **k: calls.append(k["pooling"]) or real(*a, **k))
    a, _ = source_mod.cached_features(src, ds, {"kind": "synthetic"}, "cls", tmp_path, progress=False)
    b, _ = source_mod.cached_features(src, ds, {"kind": "synthetic"}, "cls", tmp_path, progress=False)
    c, _ = source_mod.cached_features(src, ds, {"kind": "synthetic"}, "last4", tmp_path, progress=False)
    assert calls == ["cls", "last4"] and torch.equal(a, b) and c.shape[1] == 4 * a.shape[1]


def test_bag_features_tile_the_native_image_whatever_the_source_size(tmp_path):
    # The bag's tiles are training views' scale at native resolution: a source evaluated at a smaller size (a
    # BagSSL run's global_size is its tile size) must not shrink the image first; kNN at the end of training,
    # compare's linear probe and eval-knn all agree on that.
    import dataclasses

    from pwself.data import make_synthetic
    from pwself.eval.features import forward_tokens, normalize_images

    src = dataclasses.replace(source_mod.open_source("vit_tiny_patch16_224", in_chans=1, img_size=32), size=16)
    ds = make_synthetic(4, 32, 1)
    feats, _ = source_mod.cached_features(src, ds, {"kind": "synthetic"}, "bag", tmp_path, progress=False,
                                          device=torch.device("cpu"))
    x = normalize_images(torch.stack([ds[i][0] for i in range(4)]), src.mean, src.std)
    with torch.no_grad():
        tiles = [x[..., i:i + 16, j:j + 16] for i in (0, 16) for j in (0, 16)]
        bag = torch.stack([forward_tokens(src.backbone, t).cls for t in tiles]).mean(0)
    torch.testing.assert_close(feats, torch.nn.functional.normalize(bag, dim=1), rtol=1e-4, atol=1e-5)


def test_retrieval_ground_truth_checks(tmp_path):
    gnd = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [5]}]}
    (tmp_path / "g.json").write_text(json.dumps(gnd))
    with pytest.raises(DatasetError, match="index out of range"):
        load_ground_truth(tmp_path / "g.json")
    gnd["gnd"][0]["junk"] = [1]
    (tmp_path / "g.json").write_text(json.dumps(gnd))
    with pytest.raises(DatasetError, match="missing from .*does not match the images"):
        load_ground_truth(tmp_path / "g.json", tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pickle.dump({"imlist": Evil()}, open(tmp_path / "gnd_x.pkl", "wb"))
    with pytest.raises(DatasetError, match="cannot read ground truth"):
        load_ground_truth(tmp_path / "gnd_x.pkl")
    pickle.dump({"imlist": ["a"] * 3, "qimlist": ["q"], "gnd": [{"easy": [], "hard": [], "junk": []}]},
                open(tmp_path / "gnd_roxford5k.pkl", "wb"))
    with pytest.raises(DatasetError, match="expected \\(4993, 70\\)"):
        load_ground_truth(tmp_path / "gnd_roxford5k.pkl")


def test_knn_on_unlabelled_data_is_one_line_error(tmp_path, capsys):
    _image_folder(tmp_path / "d" / "train", 4, size=16)
    _image_folder(tmp_path / "d" / "val", 4, size=16)
    code = main(["eval-knn", "vit_tiny_patch16_224", "--data-kind", "folder", "--data-root", str(tmp_path / "d"),
                 "--ks", "2", "--img-size", "32", "--cache-dir", "", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs labels" in err and len(err.splitlines()) == 1


def test_a_run_kept_without_checkpoints_opens_from_its_exported_weights(tmp_path):
    from test_cli import _run

    assert _run(tmp_path / "run", "--epochs", "1", "eval.knn_at_end=false") == 0
    full = source_mod.open_source(str(tmp_path / "run"))
    for ckpt in (tmp_path / "run").glob("checkpoint_*.pt"):
        ckpt.unlink()
    kept = source_mod.open_source(str(tmp_path / "run"))
    assert (kept.mean, kept.std, kept.size) == (full.mean, full.std, full.size)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(kept.backbone(x), full.backbone(x))
    (tmp_path / "run" / "teacher_backbone.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint nor teacher_backbone.safetensors"):
        source_mod.open_source(str(tmp_path / "run"))


def test_a_timm_model_reads_data_whose_side_does_not_fit_its_patches(caplog):
    """The README's `eval-knn RUN vit_tiny_patch16_224` on Fashion-MNIST: 28 px data, 16 px patches. The model
    reads the images at 32 px (said in one line) instead of failing in timm's patch embedding."""
    import logging

    from pwself.data import make_synthetic

    with caplog.at_level(logging.INFO):
        src = source_mod.open_source("vit_tiny_patch16_224", in_chans=1, img_size=28)
    assert src.size == 32 and src.key.endswith(":1:32:seed0")
    assert "images read at 32 px (the data's 28 px rounded up to its 16 px patches)" in caplog.text
    feats, _ = source_mod.cached_features(src, make_synthetic(4, 28, 1), {"kind": "synthetic"}, "cls", None,
                                          progress=False)
    assert feats.shape == (4, 192) and torch.isfinite(feats).all()
