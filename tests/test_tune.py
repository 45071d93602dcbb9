"""`pwself tune`: settings drawn from a grid, each trained with the same budget and scored by kNN on held-out
train data; the test split is never read, so its labels cannot move the choice."""

import json

import pytest
import torch
from test_cli import TINY

import pwself.data as data_mod
from pwself.cli import main
from pwself.tune import TuneSpace, parse_space, sample_trials


def test_space_separates_choices_from_fixed_values_and_keeps_lists_whole():
    space = parse_space(["optim.lr=1e-3,3e-3", "views.global_scale=[0.4,1.0]", "loss.lam=0.1, 0.5"])
    assert space.choices == {"optim.lr": ["1e-3", "3e-3"], "loss.lam": ["0.1", "0.5"]}
    assert space.fixed == ["views.global_scale=[0.4,1.0]"]
    with pytest.raises(ValueError, match="nothing to tune"):
        parse_space(["optim.lr=1e-3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_space(["optim.lr"])


def test_trials_are_distinct_seeded_and_capped_by_the_grid():
    space = TuneSpace({"a": ["1", "2", "3"], "b": ["x", "y"]}, [])
    t = sample_trials(space, 4, seed=0)
    assert len(t) == 4 and len({tuple(s.items()) for s in t}) == 4
    assert t == sample_trials(space, 4, seed=0) and t != sample_trials(space, 4, seed=1)
    assert len(sample_trials(space, 50)) == 6


def _shuffled_test_labels(monkeypatch):
    """Every later open of a test split gets its labels permuted."""
    real = data_mod.open_dataset
    opened = []

    def fake(data, split, *a, **k):
        ds = real(data, split, *a, **k)
        if split == "test":
            opened.append(split)
            ds.labels = ds.labels[torch.randperm(len(ds.labels), generator=torch.Generator().manual_seed(1))]
        return ds

    monkeypatch.setattr(data_mod, "open_dataset", fake)
    return opened


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--dense", "data/scenes"], "--dense data/scenes is read by --select miou or hbird only: add --select miou"),
    (["--select", "miou"], "--select miou scores dense features: pass --dense DIR"),
    (["--select", "hbird"], "--select hbird scores dense features: pass --dense DIR"),
    (["--val-fraction", "1.5"], "--val-fraction 1.5: use a share in (0, 1)"),
    (["--select", "miou", "--dense", "d", "--dense-heldout", "0"], "--dense-heldout 0: hold out 1 or more"),
])
def test_tune_selection_flags_that_would_be_ignored_or_wrong_are_one_line_errors(tmp_path, monkeypatch, capsys,
                                                                                 flags, message):
    monkeypatch.setattr("pwself.train.train", lambda *a, **k: pytest.fail("trained despite a bad flag"))
    rc = main(["tune", "--objective", "pwml", "--trials", "2", "--out-dir", str(tmp_path), *TINY, "optim.lr=1e-4,5e-2",
               *flags])
    assert rc == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_choice_is_made_on_heldout_train_and_ignores_test_labels(tmp_path, monkeypatch, capsys):
    args = ["tune", "--objective", "dino", "--trials", "2", "--no-progress", "--val-fraction", "0.25", *TINY,
            "epochs=1", "batch_size=32", "optim.lr=1e-4,5e-2", "data.synthetic_size=128"]
    assert main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "tune.json").read_text())
    assert "compare it with: --objectives 'dino:" in capsys.readouterr().out
    assert len(first["trials"]) == 2 and {t["setting"]["optim.lr"] for t in first["trials"]} == {"1e-4", "5e-2"}
    assert all(0 <= t["heldout_knn10"] <= 100 for t in first["trials"])
    for trial in ("trial_0", "trial_1"):  # no run evaluated on test
        assert not (tmp_path / "a" / trial / "knn.json").exists()

    opened = _shuffled_test_labels(monkeypatch)
    assert main([*args, "--out-dir", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "tune.json").read_text())
    assert second["trials"] == first["trials"] and second["best"] == first["best"]
    assert opened == []  # the test split was not even opened
    assert main(["tune", "--objective", "nope", "--trials", "1", "optim.lr=1,2"]) == 2
    assert "unknown objective 'nope'" in capsys.readouterr().err


def test_parallel_trials_are_read_back_not_trained_again(tmp_path, monkeypatch, capsys):
    import pwself.train as train_mod

    trained = []
    real_train = train_mod.train
    monkeypatch.setattr(train_mod, "train",
                        lambda cfg, *a, **k: trained.append(cfg.out_dir) or real_train(cfg, *a, **k))
    args = ["tune", "--objective", "dino", "--trials", "2", "--no-progress", "--out-dir", str(tmp_path), *TINY,
            "epochs=1", "batch_size=32", "optim.lr=1e-4,5e-2", "data.synthetic_size=64"]
    assert main([*args, "--trial", "1"]) == 0
    assert "trial 1 " in capsys.readouterr().out and trained == [str(tmp_path / "trial_1")]
    assert not (tmp_path / "tune.json").exists()  # a worker only scores its trial
    assert main(args) == 0  # the collecting call trains the missing trial only
    assert trained == [str(tmp_path / "trial_1"), str(tmp_path / "trial_0")]
    scored = json.loads((tmp_path / "trial_1" / "tune_score.json").read_text())["heldout_knn10"]
    assert json.loads((tmp_path / "tune.json").read_text())["trials"][1]["heldout_knn10"] == scored
    assert main([*args, "--trial", "2"]) == 2
    assert "--trial 2: this grid and --trials give trials 0..1" in capsys.readouterr().err


def _fair_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "fair_comparison.py"
    spec = importlib.util.spec_from_file_location("fair_comparison", path)
    fair = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fair)
    return fair


def test_fair_comparison_adds_logo_and_cossl_to_dinos_chosen_recipe():
    fair = _fair_script()
    chosen = {"dino": "dino:optim.lr=2e-3", "logo": "logo:loss.logo_weight=1e-2", "cossl": "cossl", "pwml": "pwml"}
    assert fair.claim_labels(chosen) == {"dino_shared": "dino", "cossl_on_dino": "cossl:optim.lr=2e-3",
                                         "logo_on_dino": "logo:optim.lr=2e-3+loss.logo_weight=1e-2"}
    assert fair.claim_labels({"pwml": "pwml"}) == {}
    assert fair.claim_labels({"dino": "dino:optim.lr=2e-3", "ibot": "ibot"}) == {}  # nothing added to DINO
    assert set(fair.SPACES) == {"dino", "pwml", "logo", "cossl", "bagssl", "ibot", "dinov2_ema", "pwml_ibot"}
    assert all(len(sample_trials(parse_space(space), 4)) == 4 for space in fair.SPACES.values())  # equal trials
    assert all(fair.SPACES[m] == fair.SPACES["dino"] for m in fair.DENSE_METHODS)  # the same trials


def test_fair_comparison_dense_study_selects_by_heldout_miou_and_probes_dense(tmp_path, monkeypatch, capsys):
    fair = _fair_script()
    calls = []

    def fake_run_all(commands, jobs, logs):
        for name, argv in commands:
            calls.append((name, argv))
            if name.startswith("tune_") and "--trial" not in argv:  # the collecting call writes the choice
                out = Path(argv[argv.index("--out-dir") + 1])
                out.mkdir(parents=True, exist_ok=True)
                m = argv[argv.index("--objective") + 1]
                trials = [{"setting": {"optim.lr": lr}, "heldout_miou": score}
                          for lr, score in (("2e-3", 17.0 + len(m) / 10), ("4e-3", 16.5))]
                (out / "tune.json").write_text(json.dumps({"compare_label": f"{m}:optim.lr=2e-3", "trials": trials,
                                                           "best": trials[0], "score_key": "heldout_miou"}))
            if name == "compare":
                out = Path(argv[argv.index("--out-dir") + 1])
                out.mkdir(parents=True, exist_ok=True)
                (out / "comparison.md").write_text("table\n")

    from pathlib import Path

    monkeypatch.setattr(fair, "_run_all", fake_run_all)
    fair.main(["--dense", "data/scenes", "--out", str(tmp_path), "--trials", "2", "--seeds", "1,2"])
    tunes = [argv for name, argv in calls if name.startswith("tune_")]
    assert len(tunes) == 5 * 2 + 5  # every method's two trials, then its choice
    for argv in tunes:
        assert argv[argv.index("--select") + 1] == "miou" and argv[argv.index("--dense") + 1] == "data/scenes"
        assert argv[argv.index("--config") + 1] == "fmnist_scenes"
    runs = [argv for name, argv in calls if name.startswith("run_") or name == "compare"]
    assert len(runs) == 5 * 2 + 1 and all(argv[argv.index("--dense") + 1] == "data/scenes" for argv in runs)
    assert {argv[argv.index("--objectives") + 1] for argv in runs[:-1]} == {
        f"{m}:optim.lr=2e-3" for m in fair.DENSE_METHODS}
    # Seed by seed, so a study stopped part-way has every method at the same seeds.
    assert [argv[argv.index("--seeds") + 1] for argv in runs[:-1]] == ["1"] * 5 + ["2"] * 5
    assert not any(name == "pooling" for name, _ in calls)  # BagSSL's pooling claim is not part of it
    assert json.loads((tmp_path / "chosen.json").read_text())["ibot"] == "ibot:optim.lr=2e-3"
    # One table of every method's trials, the same settings on the same rows, each choice in bold.
    assert (tmp_path / "tuning.md").read_text().splitlines() == [
        "| setting | dino | ibot | dinov2_ema | pwml | pwml_ibot |", "|---|---|---|---|---|---|",
        "| optim.lr=2e-3 | **17.40** | **17.40** | **18.00** | **17.40** | **17.90** |",  # 17 + len(name) / 10
        "| optim.lr=4e-3 | 16.50 | 16.50 | 16.50 | 16.50 | 16.50 |"]


def _scenes(tmp_path, fake_fmnist, n_train=30):
    from pwself.data.scenes import SceneSpec, make_scenes

    out = tmp_path / "scenes"
    make_scenes(out, SceneSpec(size=16, n_train=n_train, n_test=10, item_size=(6, 10)), str(fake_fmnist),
                progress=False)
    return out


def test_dense_heldout_split_is_seeded_disjoint_from_the_probes_images_and_skips_test(tmp_path, fake_fmnist,
                                                                                       monkeypatch):
    import pwself.eval.dense as dense_mod
    from pwself.data.datasets import DatasetError

    root = _scenes(tmp_path, fake_fmnist)
    opened = []
    real = dense_mod.open_dense
    monkeypatch.setattr(dense_mod, "open_dense", lambda r, split, *a: opened.append(split) or real(r, split, *a))
    train, held = dense_mod._split_pair(str(root), 1, 16, train_images=20, heldout=8)
    assert opened == ["train"] and len(train) == 20 and len(held) == 8
    assert not set(train.images) & set(held.images)  # the probe never learns from a scored image
    assert all(p.parent == root / "train" / "images" for p in held.images)
    assert [m.stem for m in held.masks] == [p.stem for p in held.images]
    assert dense_mod._split_pair(str(root), 1, 16, 20, 8)[1].images == held.images  # the same for every model
    all_train, test = dense_mod._split_pair(str(root), 1, 16, train_images=0)
    assert len(all_train) == 30 and test.images[0].parent == root / "test" / "images"
    with pytest.raises(DatasetError, match="pass --dense-heldout 6"):
        dense_mod._split_pair(str(root), 1, 16, 20, 30)


@pytest.mark.slow
def test_dense_selection_chooses_by_heldout_miou_without_the_test_split(tmp_path, fake_fmnist, monkeypatch, capsys):
    import shutil

    import pwself.tune as tune_mod

    root = _scenes(tmp_path, fake_fmnist, n_train=40)
    shutil.rmtree(root / "test")  # tuning must not need it
    out = tmp_path / "tune"
    args = ["tune", "--objective", "pwml", "--trials", "2", "--no-progress", "--out-dir", str(out), *TINY,
            "epochs=1", "batch_size=32", "optim.lr=1e-4,5e-2", "data.synthetic_size=64", "--select", "miou",
            "--dense", str(root), "--dense-heldout", "10"]
    assert main(args) == 0
    res = json.loads((out / "tune.json").read_text())
    scores = [t["heldout_miou"] for t in res["trials"]]
    assert res["select"] == "miou" and all(0 <= s <= 100 for s in scores)
    assert res["best"]["heldout_miou"] == max(scores)
    assert "| held-out dense mIoU |" in capsys.readouterr().out
    # The score is the dense probe's mIoU on the held-out images, whatever else the run has scored.
    direct = tune_mod.heldout_miou(_teacher(out / "trial_0"), _saved(out / "trial_0"), str(root), 10)
    assert direct == pytest.approx(res["trials"][0]["heldout_miou"], abs=1e-9)
    # A different held-out set rescores the trials; nothing is trained again.
    monkeypatch.setattr("pwself.train.train", lambda *a, **k: pytest.fail("a finished trial was retrained"))
    assert main([*args[:-1], "12"]) == 0
    again = json.loads((out / "trial_0" / "tune_score_miou.json").read_text())
    assert again["heldout"] == {"dense_root": str(root), "dense_heldout": 12}
    assert main(args[:-4]) == 2
    assert "pass --dense DIR" in capsys.readouterr().err
    # Hummingbird as the cheap score: the same trials rescored without training a probe, its own cache file.
    hb = [*args[:args.index("--select") + 1], "hbird", *args[args.index("--select") + 2:]]
    assert main(hb) == 0
    res = json.loads((out / "tune.json").read_text())
    assert res["select"] == "hbird" and res["score_key"] == "heldout_hbird_miou"
    direct = tune_mod.heldout_miou(_teacher(out / "trial_1"), _saved(out / "trial_1"), str(root), 10, "hbird")
    assert direct == pytest.approx(res["trials"][1]["heldout_hbird_miou"], abs=1e-9)
    assert (out / "trial_1" / "tune_score_hbird.json").exists()
    head = (out / "tune.md").read_text().splitlines()[0]  # the table says what scored it (it said kNN before)
    assert head.startswith("Tuning pwml: held-out Hummingbird mIoU (%) on 10 held-out train images of")


def _teacher(run_dir):
    from pwself.experiment import open_teacher

    return open_teacher(run_dir, "cpu").backbone


def _saved(run_dir):
    from pwself.config import load_config

    return load_config(str(run_dir / "config.yaml"), [])
