"""Issue 39's defects a new user hit, one test each (items 4, 5, 9, 13, 14, 15, 16, 17; the caches are in
test_trusted_caches.py, preemption in test_preemption.py, the recipe name in test_ibot.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import TINY, _run

from pwself.cli import main
from pwself.config import ConfigError, load_config

QUIET = ["eval.knn_at_end=false", "eval.knn_floors=false"]
ROOT = Path(__file__).resolve().parents[1]


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


def _colour_folder(root, n=8, labelled=False):
    rng = np.random.default_rng(0)
    for k in range(n):
        folder = root / ("train" if labelled else "") / (f"c{k % 2}" if labelled else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{k}.jpg")
    return root


def test_4_a_shown_config_saved_and_edited_to_a_colour_folder_trains_on_colour(tmp_path, capsys):
    assert main(["config", "show"]) == 0
    saved = tmp_path / "my.yaml"
    saved.write_text(capsys.readouterr().out.replace("kind: idx", "kind: folder"))
    assert "in_chans: 0" in saved.read_text()  # from the data, not the default data's 1
    cfg = load_config(saved, [f"data.root={_colour_folder(tmp_path / 'photos')}"])
    assert cfg.backbone.in_chans == 3


def test_4_and_17_config_show_prints_a_config_pretrain_would_refuse_and_says_why(capsys):
    assert main(["config", "show", "backbone.name=vit_tiny_patch16_224"]) == 0
    captured = capsys.readouterr()
    assert "name: vit_tiny_patch16_224" in captured.out and "patch_size: 16" in captured.out
    assert "pretrain would refuse this config: views.global_size=28 is not a multiple of the patch size 16" in \
        captured.err


def test_5_folder_evaluation_reads_images_at_the_side_the_model_trains_at():
    cfg = load_config(None, ["data.kind=folder", "views.global_size=64", "views.local_size=32",
                             "backbone.patch_size=8"])
    assert cfg.data.image_size == 64  # was 32: the kNN of a 64 px model read 32 px thumbnails
    assert load_config(None, ["data.kind=folder", "data.image_size=96"]).data.image_size == 96
    assert load_config(None, ["data.kind=synthetic"]).data.image_size == 32  # synthetic: the images' own side


def test_9_an_output_prefix_never_replaces_a_users_file_without_overwrite(tmp_path, capsys):
    (tmp_path / "proj").mkdir()
    readme = tmp_path / "proj" / "README.md"
    readme.write_text("my project")
    argv = ["eval-knn", "vit_tiny_patch16_224", "--data-kind", "synthetic", "--ks", "1", "--cache-dir", "",
            "--no-progress", "--output", str(tmp_path / "proj" / "README")]
    assert main(argv) == 2
    err = _err(capsys)
    assert f"--output would replace {readme}, which exists" in err and "--overwrite" in err
    assert readme.read_text() == "my project"
    assert main([*argv, "--overwrite"]) == 0 and "| vit_tiny_patch16_224 (random init) |" in readme.read_text()


def test_13_compare_on_an_unlabelled_folder_is_refused_before_any_training(tmp_path, capsys):
    photos = _colour_folder(tmp_path / "photos")
    assert main(["compare", "--objectives", "dino,pwml", "--seeds", "0", "--out-dir", str(tmp_path / "cmp"),
                 "--no-progress", "data.kind=folder", f"data.root={photos}"]) == 2
    err = _err(capsys)
    assert "has none (unlabelled images, or no val/ or test/ folder)" in err and "train/CLASS/" in err
    assert not list((tmp_path / "cmp").glob("*_seed0"))  # no run was started
    labelled = _colour_folder(tmp_path / "labelled", labelled=True)  # labelled train/ but no val/: refused too
    assert main(["compare", "--objectives", "dino", "--seeds", "0", "--out-dir", str(tmp_path / "cmp2"),
                 "--no-progress", "data.kind=folder", f"data.root={labelled}"]) == 2


@pytest.mark.parametrize("override,expected", [
    ("optim.lr=[0.001,0.002]", "optim.lr must be a number, got [0.001, 0.002]"),
    ("batch_size=[1]", "batch_size must be int, got [1]"),
    ("data.root=[a]", "data.root must be str, got ['a']"),
])
def test_14_a_value_of_the_wrong_type_is_one_line(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


@pytest.mark.slow
def test_14_a_duplicate_yaml_key_and_a_tagged_or_tabbed_run_config_are_one_line(tmp_path, capsys):
    dup = tmp_path / "dup.yaml"
    dup.write_text("optim:\n  lr: 1.0e-3\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 3.*key 'lr' appears twice"):
        load_config(dup)
    out = tmp_path / "run"
    assert _run(out, "--epochs", "1", *QUIET) == 0
    original = (out / "config.yaml").read_text()
    for broken in ("!!python/object:os.system {}\n" + original, original.replace("  ", "\t", 1)):
        (out / "config.yaml").write_text(broken)
        assert main(["report", str(out)]) == 2
        err = _err(capsys)
        assert "run config" in err and "config.yaml is not valid YAML at line" in err


@pytest.mark.slow
def test_15_an_export_folder_never_makes_load_download_or_read_other_files(tmp_path):
    import pwself
    from pwself.run.checkpoint import CheckpointError

    out = tmp_path / "run"
    assert _run(out, "--epochs", "1", *QUIET) == 0
    folder = tmp_path / "model"
    assert main(["export", str(out), "--format", "folder", str(folder)]) == 0
    cfg = json.loads((folder / "config.json").read_text())
    for bad, words in ((dict(cfg, architecture="hf-hub:timm/vit_small_patch16_224"), "is not a timm model name"),
                       (dict(cfg, model_args={**cfg["model_args"], "checkpoint_path": str(out / "config.yaml")}),
                        "model_args checkpoint_path would make timm read other files")):
        (folder / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=words) as info:
            pwself.load(folder)
        assert str(folder / "config.json") in str(info.value)
    with pytest.raises(CheckpointError, match="holds weights only: pass the run folder"):
        pwself.load(out / "teacher_backbone.safetensors")


@pytest.mark.slow
def test_16_an_export_publishes_no_local_path_and_names_its_architecture(tmp_path):
    photos = _colour_folder(tmp_path / "secret" / "photos")
    out = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(out), "--epochs", "1", "--batch-size", "4", "--no-progress",
                 "data.kind=folder", f"data.root={photos}", "data.num_workers=0", "views.global_size=32",
                 "views.local_size=16", "views.n_local=2", "backbone.name=vit_small_patch16_224",
                 "backbone.model_args={embed_dim: 32, depth: 1, num_heads: 2}", "head.out_dim=16", *QUIET]) == 0
    assert main(["export", str(out), "--format", "folder", str(tmp_path / "model")]) == 0
    for name in ("config.json", "README.md"):
        text = (tmp_path / "model" / name).read_text()
        assert str(tmp_path) not in text and "secret" not in text, name
    assert json.loads((tmp_path / "model" / "config.json").read_text())["architecture"] == "vit_small_patch16_224"


@pytest.mark.slow
def test_17_a_curve_of_an_unlabelled_run_and_an_unknown_benchmark_say_what_is_wrong(tmp_path, capsys):
    photos = _colour_folder(tmp_path / "photos")
    out = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(out), "--epochs", "1", "--batch-size", "4", "--no-progress",
                 "data.kind=folder", f"data.root={photos}", "data.num_workers=0", *TINY[1:], *QUIET]) == 0
    assert main(["viz-curves", str(out), "--output", str(tmp_path / "c.png")]) == 2
    err = _err(capsys)
    assert "no labelled val/ or test/ split, so kNN cannot score it" in err and "knn_every_epochs" not in err
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "step_ratoi", "--output",
                          str(tmp_path / "b.json")], capture_output=True, text=True)
    assert res.returncode == 2 and "--only step_ratoi: no such benchmark" in res.stderr
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_17_the_readme_run_file_table_names_every_file_a_finished_run_keeps(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "1") == 0
    table = (ROOT / "README.md").read_text().split("## What a run writes")[1].split("##")[0]
    for p in out.iterdir():
        name = p.name
        generic = {"checkpoint_0": "checkpoint_*.pt", "floor_": "floor_*.json", "matches_": "matches_*.png",
                   "attention_": "attention_*.png"}
        shown = next((v for k, v in generic.items() if name.startswith(k)), name)
        assert f"`{shown}`" in table, name


def test_17_a_backbone_init_of_other_sizes_names_the_files_model(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from pwself.run.checkpoint import CheckpointError
    from pwself.step import build_step

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=28, patch_size=7,
                              in_chans=1, embed_dim=48, depth=3, num_heads=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    cfg = load_config(None, ["backbone.patch_size=7", "views.local_size=14", "backbone.embed_dim=32",
                             "backbone.depth=3", "backbone.num_heads=2", f"backbone.init={tmp_path / 'w.safetensors'}"])
    with pytest.raises(CheckpointError, match=r"the file's model: width 48, depth 3, patch 7, 1 channel\(s\)"):
        build_step(cfg, torch.device("cpu"), [0.5], [0.25])
