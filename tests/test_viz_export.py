"""Figures, report and export on a tiny checkpoint: decodable PNG/HTML, timm round trip to 1e-5."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from test_cli import TINY

import pwself
from pwself.cli import main
from pwself.export import export_checkpoint
from pwself.viz import cls_attention, patch_pca_rgb


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["pretrain", "--out-dir", str(out), "--epochs", "1", "--batch-size", "32", "--no-progress", *TINY,
                 "eval.knn_at_end=false"]) == 0
    return out


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    paths = []
    for k in range(2):
        arr = (torch.rand(40, 50, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"img{k}.png")
        paths.append(str(d / f"img{k}.png"))
    return paths


def _decodable_png(path):
    with Image.open(path) as im:
        im.load()
        assert im.size[0] > 100 and im.size[1] > 100
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank canvas


@pytest.mark.parametrize("fmt,suffix", [("safetensors", ".safetensors"), ("timm", ".pth")])
def test_export_loads_in_timm_with_identical_features(run_dir, tmp_path, fmt, suffix):
    path, code = export_checkpoint(run_dir, tmp_path / f"bb{suffix}", fmt)
    assert "pretrained_cfg_overlay" in code
    cfg_kwargs = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, mlp_ratio=4.0,
                      num_classes=0, dynamic_img_size=True)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **cfg_kwargs)  # strict loading: a missing or unexpected key raises
    ours = pwself.load(run_dir)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), ours.forward_features(x), rtol=0, atol=1e-5)


def test_report_html_and_figures(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7  # curves + 3 match + 3 attention figures
    for name in ("training_curves.png", "matches_0.png", "attention_0.png"):
        _decodable_png(run_dir / name)


def test_viz_matches_and_attention_cli(run_dir, image_files, tmp_path):
    assert main(["viz-matches", *image_files, "--out-dir", str(tmp_path / "viz")]) == 0
    matches = (tmp_path / "viz" / "matches_grid.png").read_bytes()
    assert main(["viz-attention", str(run_dir), *image_files, "--out-dir", str(tmp_path / "viz")]) == 0
    for name in ("img0_matches.png", "img1_matches.png", "matches_grid.png", "img0_attention.png",
                 "attention_grid.png"):
        _decodable_png(tmp_path / "viz" / name)
    # the README runs both into one folder: neither replaces the other's files
    assert (tmp_path / "viz" / "matches_grid.png").read_bytes() == matches


def test_viz_matches_takes_a_runs_sizes_and_explains_zero_matches(run_dir, image_files, tmp_path, monkeypatch,
                                                                    capsys):
    """Issue 28, item 8: --run reads the run's view, patch and photometric settings (flags still win), and a
    pair of crops without a match says why."""
    import pwself.viz as viz

    calls, real = [], viz.draw_matches

    def spy(img, patch, global_size, local_size, seed, photometric, path, **kw):
        fig = real(img, patch, global_size, local_size, seed, photometric, path, **kw)
        calls.append((img.shape[0], patch, global_size, local_size, photometric))
        fig.matched_pairs = 0 if len(calls) == 1 else fig.matched_pairs  # as if the first pair did not overlap
        return fig

    monkeypatch.setattr(viz, "draw_matches", spy)
    assert main(["viz-matches", *image_files, "--run", str(run_dir), "--out-dir", str(tmp_path / "v")]) == 0
    assert calls[0] == (1, 4, 16, 8, "patch")  # TINY: grey, patch 4, views 16 / 8
    assert "img0.png: the two crops do not overlap, so no patch matches; try another --seed" in capsys.readouterr().out
    assert main(["viz-matches", image_files[0], "--run", str(run_dir), "--global-size", "24",
                 "--out-dir", str(tmp_path / "v")]) == 0
    assert calls[-1][2] == 24
    assert main(["viz-matches", image_files[0], "--run", str(tmp_path / "nope")]) == 2
    assert "--run" in capsys.readouterr().err


def test_viz_bad_input_one_line(tmp_path, capsys):
    assert main(["viz-matches", str(tmp_path / "nope.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["viz-matches", str(tmp_path / "bad.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["viz-matches", str(tmp_path / "bad.png"), "--global-size", "50"]) == 2
    assert "not a multiple of --patch-size" in capsys.readouterr().err


def test_attention_rows_are_distributions_and_pca_range(run_dir):
    model = pwself.load(run_dir)
    x = torch.randn(2, 1, 16, 16)
    att = cls_attention(model, x)
    assert att.shape == (2, 2, 4, 4)
    # CLS attention over patches is the softmax row minus the CLS->CLS weight: sums to < 1, > 0.
    s = att.sum((-2, -1))
    assert (s > 0).all() and (s < 1).all()
    rgb = patch_pca_rgb(torch.randn(16, 32))
    assert rgb.shape == (16, 3) and rgb.min() == 0 and rgb.max() == 1


def test_export_folder_loads_in_timm_and_pwself_with_a_model_card(run_dir, tmp_path, capsys):
    import json

    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--format", "folder", str(out)]) == 0
    assert "pwself.load(" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["img_size"], cfg["patch_size"], cfg["in_chans"], cfg["num_classes"]) == (16, 4, 1, 0)
    assert len(cfg["mean"]) == len(cfg["std"]) == 1 and cfg["pwself"]["objective"] == "pwml"
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), **cfg["model_args"])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = pwself.load(run_dir).forward_features(x)
        torch.testing.assert_close(model.eval().forward_features(x), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(pwself.load(out).forward_features(x), ref, rtol=0, atol=1e-5)
    card = " ".join((out / "README.md").read_text().split())
    assert "objective `pwml`" in card and "3 steps of batch 32" in card and "pwself.load(" in card
    # Issue 28, items 3 and 9: the card says the model's own size and the lr it trained with, and carries the
    # front matter the Hub reads; config.json is timm's own (save_for_hf), so timm's local-dir loader takes it.
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["library_name"] == "timm" and front["license"] == "apache-2.0" and "pwml" in front["tags"]
    assert "datasets" not in front  # synthetic data: no Hub dataset to name (idx: fashion_mnist)
    assert "(width 32, depth 1, 2 heads, patch 4, 16 px input)" in card and "names the timm builder" in card
    assert "lr 0.0005 per 256 images, i.e. 6.25e-05 at batch 32" in card
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert local.pretrained_cfg["input_size"] == (1, 16, 16) and local.pretrained_cfg["interpolation"] == "bicubic"
    with torch.no_grad():
        torch.testing.assert_close(local.forward_features(x), ref, rtol=0, atol=1e-5)


def test_push_to_hub_uploads_the_folder_through_huggingface_hub(run_dir, tmp_path, monkeypatch):
    import sys
    import types

    from pwself.export import export_folder, push_to_hub

    calls = []

    class FakeApi:  # the real client needs a token and the network; its two calls are what matters
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", sorted(p.name for p in Path(folder_path).iterdir()), repo_id))

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FakeApi))
    folder = export_folder(run_dir, tmp_path / "m")
    assert push_to_hub(folder, "me/tiny", private=True) == "https://hub.example/me/tiny"
    assert calls == [("create", "me/tiny", True, True),
                     ("upload", ["README.md", "config.json", "model.safetensors"], "me/tiny")]
    with pytest.raises(FileNotFoundError, match="not an exported model folder"):
        push_to_hub(tmp_path, "me/x")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install 'pwself\[hub\]'"):
        push_to_hub(folder, "me/tiny")


def test_every_way_of_loading_carries_the_runs_preprocessing(run_dir, tmp_path):
    """A run folder, a checkpoint file and an export folder all give timm the run's input size, mean, std and
    interpolation (issue 28, item 1); the card's timm-alone snippet does too."""
    import json

    from timm.data import create_transform, resolve_model_data_config

    cfg = yaml_config(run_dir)
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--format", "folder", str(out)]) == 0
    folder_cfg = json.loads((out / "config.json").read_text())
    by_timm = timm.create_model(folder_cfg["architecture"], pretrained=True, **folder_cfg["model_args"],
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                            **folder_cfg["pretrained_cfg"]))
    checkpoint = sorted(run_dir.glob("checkpoint_0*.pt"))[-1]
    for model in (pwself.load(run_dir), pwself.load(checkpoint), pwself.load(out), by_timm):
        data = resolve_model_data_config(model)
        size = cfg["views"]["global_size"]
        assert tuple(data["input_size"]) == (cfg["backbone"]["in_chans"], size, size)
        assert tuple(data["mean"]) == pytest.approx(tuple(cfg["data"]["mean"]))
        assert tuple(data["std"]) == pytest.approx(tuple(cfg["data"]["std"]))
        assert (data["interpolation"], data["crop_pct"]) == ("bicubic", 1.0)
        assert create_transform(**data) is not None
    assert "resolve_model_data_config" in (out / "README.md").read_text()


def yaml_config(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_training_curves_mark_a_single_row_and_say_when_nothing_is_logged(tmp_path):
    """Issue 28, item 3: one logged row is drawn as points (a line through one point is invisible)."""
    import matplotlib.pyplot as plt

    from pwself.viz import plot_training_curves

    row = {"step": 3, "epoch": 1, "loss": 3.6, "cls": 1.3, "patch": 4.5, "n_match": 4.1, "lr": 5e-6,
           "momentum": 0.996, "teacher_temp": 0.04, "teacher_entropy": 0.8, "teacher_mean_entropy": 0.9}
    figures = []
    real_close = plt.close
    plt.close = lambda fig=None: figures.append(fig)  # keep the figure to look at its lines
    try:
        plot_training_curves([row], tmp_path / "one.png")
        plot_training_curves([], tmp_path / "none.png")
    finally:
        plt.close = real_close
    lines = [line for ax in figures[0].axes for line in ax.get_lines()]
    assert lines and all(line.get_marker() == "o" for line in lines)
    assert all(ax.texts[0].get_text() == "nothing logged yet" for ax in figures[1].axes[:4])
