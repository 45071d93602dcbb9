"""`pwself compare`: same budget for every objective, table and plot, finished runs skipped on rerun."""

import json

import pytest
from PIL import Image
from test_cli import TINY

import pwself.compare as compare_mod
import pwself.eval.floors as floors_mod
from pwself.cli import main


@pytest.mark.slow
def test_compare_two_objectives_writes_table_plot_and_skips_finished(tmp_path, capsys, monkeypatch, fake_fmnist):
    from pwself.data.scenes import SceneSpec, make_scenes

    scenes = tmp_path / "scenes"
    make_scenes(scenes, SceneSpec(size=16, n_train=24, n_test=8, item_size=(6, 12)), str(fake_fmnist), progress=False)
    args = ["compare", "--objectives", "dino,pwml:photometric.mode=none", "--seeds", "0", "--out-dir",
            str(tmp_path), "--no-progress", *TINY, "epochs=1", "batch_size=32", "--dense", str(scenes)]
    assert main(args) == 0
    md = (tmp_path / "comparison.md").read_text()
    assert "| dino |" in md and "| pwml:photometric.mode=none |" in md and "±" not in md  # one seed: no spread
    assert "| objective | kNN k=10 | kNN k=20 | linear | dense mIoU | Hummingbird mIoU |" in md
    assert "| *random init (same backbone, CLS)* |" in md and "| *raw pixels (floor)* |" in md
    res = json.loads((tmp_path / "comparison.json").read_text())
    for label in ("dino", "pwml:photometric.mode=none"):
        r = res["runs"][label]["0"]
        assert 0 <= r["knn10"] <= 100 and 0 <= r["linear"] <= 100 and 0 <= r["miou"] <= 100
        assert 0 <= r["hbird_miou"] <= 100
    # every protocol has both floors, the linear, dense and Hummingbird ones included
    assert {"knn10", "linear", "miou", "hbird_miou"} <= set(res["pixel_floor"])
    assert {"linear", "miou", "hbird_miou"} <= set(res["random_init"]["0"])
    cfg_dino = (tmp_path / "dino_seed0" / "config.yaml").read_text()
    cfg_pwml = (tmp_path / "pwml_photometric.mode-none_seed0" / "config.yaml").read_text()
    diff = {a for a, b in zip(cfg_dino.splitlines(), cfg_pwml.splitlines()) if a != b}
    assert {d.split(":")[0].strip() for d in diff} <= {"objective", "mode", "out_dir"}  # same budget, same model
    with Image.open(tmp_path / "comparison.png") as im:
        assert im.size[0] > 300

    # Rerun: nothing is trained again.
    monkeypatch.setattr("pwself.train.train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    capsys.readouterr()
    assert main(args) == 0
    assert "| dino |" in capsys.readouterr().out
    assert compare_mod.comparison_table(res) == md

    # Another dense dataset (issue 39, item 2): the same runs, their dense scores and floors measured on it.
    other = tmp_path / "scenes_b"
    make_scenes(other, SceneSpec(size=16, n_train=24, n_test=8, item_size=(4, 8), seed=5), str(fake_fmnist),
                progress=False)
    assert main([*args[:-1], str(other)]) == 0
    res_b = json.loads((tmp_path / "comparison.json").read_text())
    assert res_b["dense_data"] == str(other)
    for label in ("dino", "pwml:photometric.mode=none"):
        assert res_b["runs"][label]["0"]["miou"] != res["runs"][label]["0"]["miou"]
    assert res_b["random_init"]["0"]["miou"] != res["random_init"]["0"]["miou"]
    assert res_b["pixel_floor"]["miou"] != res["pixel_floor"]["miou"]


def test_objective_list_keeps_commas_inside_brackets(tmp_path, monkeypatch):
    seen = {}

    def fake(base, objectives, seeds, out_dir, progress=True, dense=None, runs_only=False, protocols=()):
        seen["objectives"], seen["seeds"] = objectives, seeds
        return {"objectives": objectives, "seeds": seeds, "runs": {}}

    monkeypatch.setattr("pwself.compare.run_comparison", fake)
    spec = "dino,bagssl:views.n_local=0+views.global_scale=[0.25,0.25],pwml"
    assert main(["compare", "--objectives", spec, "--seeds", "0,1", "--out-dir", str(tmp_path), *TINY]) == 0
    assert seen["objectives"] == ["dino", "bagssl:views.n_local=0+views.global_scale=[0.25,0.25]", "pwml"]
    assert seen["seeds"] == [0, 1]


def test_pixel_floor_is_knn_on_raw_pixels_and_joins_the_table(tmp_path):
    import torch
    import torch.nn.functional as F

    from pwself.config import load_config
    from pwself.data import open_dataset
    from pwself.eval.knn import knn_classify

    cfg = load_config(None, [t for t in TINY if "=" in t])
    floor = floors_mod.pixel_floor(cfg, tmp_path / "floor.json")
    tr, te = (open_dataset(cfg.data, split, cfg.backbone.in_chans, cfg.backbone.patch_size, cfg.seed)
              for split in ("train", "test"))
    x_tr = F.normalize(torch.stack([tr[i][0] for i in range(len(tr))]).flatten(1).float(), dim=1)
    x_te = F.normalize(torch.stack([te[i][0] for i in range(len(te))]).flatten(1).float(), dim=1)
    y_tr = torch.tensor([int(tr[i][1]) for i in range(len(tr))])
    y_te = torch.tensor([int(te[i][1]) for i in range(len(te))])
    ref = knn_classify(x_tr, y_tr, x_te, y_te, ks=(10, 20))
    assert floor == {"knn10": ref[10]["top1"], "knn20": ref[20]["top1"]}
    assert floors_mod.pixel_floor(cfg, tmp_path / "floor.json") == floor  # cached
    runs = {"dino": {"0": {"knn10": 1.0, "knn20": 2.0, "linear": 3.0}}}
    table = compare_mod.comparison_table({"seeds": [0], "runs": runs, "pixel_floor": floor})
    assert f"| *raw pixels (floor)* | {floor['knn10']:.2f} | {floor['knn20']:.2f} | — |" in table


def test_random_init_floor_is_the_runs_knn_protocol_on_the_seeded_init(tmp_path):
    import torch

    from pwself.config import load_config
    from pwself.data import channel_stats, open_dataset
    from pwself.experiment import knn_scores
    from pwself.step import build_step

    cfg = load_config(None, [t for t in TINY if "=" in t] + ["seed=3"])
    floor = floors_mod.random_init_floor(cfg, tmp_path / "random.json")
    cfg.data.mean, cfg.data.std = channel_stats(open_dataset(cfg.data, "train", cfg.backbone.in_chans,
                                                                cfg.backbone.patch_size, cfg.seed))
    step = build_step(cfg, torch.device("cpu"), cfg.data.mean, cfg.data.std)  # the init a run with seed 3 trains
    ref = knn_scores(step.model.backbone, cfg, False)  # the run's own kNN
    assert (floor["knn10"], floor["knn20"]) == (ref[10]["top1"], ref[20]["top1"])
    assert 0 <= floor["linear"] <= 100
    assert floors_mod.random_init_floor(cfg, tmp_path / "random.json") == floor  # cached
    table = compare_mod.comparison_table({"seeds": [3], "runs": {}, "random_init": {"3": floor}})
    assert f"| *random init (same backbone, CLS)* | {floor['knn10']:.2f} |" in table  # one seed: no "± 0.00"


def test_runs_only_trains_and_evaluates_but_writes_no_floors_or_table(tmp_path, monkeypatch):
    from pwself.config import load_config

    ran = []
    monkeypatch.setattr(compare_mod, "_run_one", lambda cfg, *a: ran.append(cfg.out_dir) or {"knn10": 1.0})
    monkeypatch.setattr(compare_mod, "pixel_floor", lambda *a, **k: pytest.fail("no floor in a worker"))
    base = load_config(None, [t for t in TINY if "=" in t])
    res = compare_mod.run_comparison(base, ["dino"], [3], tmp_path, runs_only=True)
    assert ran == [str(tmp_path / "dino_seed3")] and res["runs"] == {"dino": {"3": {"knn10": 1.0}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == []
