"""End to end through the CLI on synthetic data: checkpoints, logs, resume, report, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pwself.cli import main
from pwself.run.checkpoint import load_checkpoint

TINY = ["data.kind=synthetic", "data.synthetic_size=96", "views.global_size=16", "views.local_size=8",
        "views.n_local=2", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
        "head.out_dim=16", "head.hidden_dim=32", "head.bottleneck_dim=16", "log_every=1", "keep_checkpoints=5"]


def _run(out, *extra):
    flags = [x for x in extra if "=" not in x]
    overrides = [x for x in extra if "=" in x]  # after TINY, so they win
    return main(["pretrain", "--out-dir", str(out), "--batch-size", "32", "--no-progress", *flags, *TINY, *overrides])


@pytest.mark.slow
def test_smoke_two_epochs_then_resume_is_exact(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "2", "eval.knn_every_epochs=1") == 0
    printed = capsys.readouterr().out
    assert "per evaluated epoch" in (out / "report.md").read_text()  # epoch 1 (during) + end of run
    assert "report:" in printed and "| pwml | 10 |" in printed
    for name in ("config.yaml", "metrics.jsonl", "checkpoint_00000003.pt", "checkpoint_00000006.pt",
                 "teacher_backbone.safetensors", "knn.json", "training_curves.png", "report.html", "report.md"):
        assert (out / name).exists(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["n_match"] > 0 for r in rows)
    straight = load_checkpoint(out / "checkpoint_00000006.pt")
    with Image.open(out / "training_curves.png") as im:
        assert im.size[0] > 500 and im.getextrema() != ((255, 255),) * len(im.getbands())
    assert "<table>" in (out / "report.html").read_text()

    # eval-knn on the run reproduces the numbers the run printed (same teacher, same features).
    assert main(["eval-knn", str(out), "--ks", "10,20", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                 "--output", str(tmp_path / "k")]) == 0
    at_end = json.loads((out / "knn.json").read_text())["knn"]
    again = json.loads((tmp_path / "k.json").read_text())["knn"]["cls"][str(out)]
    assert "| k=10 | k=20 |" in (tmp_path / "k.md").read_text()
    assert again["10"] == at_end["10"] and again["20"] == at_end["20"]

    # Simulate a run killed after epoch 1: drop what came later, then resume.
    (out / "checkpoint_00000006.pt").unlink()
    (out / "checkpoint_last.pt").unlink()
    assert _run(out, "--epochs", "2", "--resume") == 0
    resumed = load_checkpoint(out / "checkpoint_00000006.pt")
    for key in ("student", "teacher"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), name
    rows2 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows2] == [1, 2, 3, 4, 5, 6]
    assert rows2 == rows or all(a["loss"] == b["loss"] for a, b in zip(rows, rows2))


@pytest.mark.slow
def test_resume_with_other_config_names_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "1", "eval.knn_at_end=false") == 0
    capsys.readouterr()
    assert _run(out, "--epochs", "1", "--resume", "optim.lr=0.1", "loss.objective=dino", "head.out_dim=8") == 2
    err = capsys.readouterr().err.strip()
    # optim.lr is a divergence fix a resume may change; the others change what is learned
    assert "config differs in head.out_dim, loss.objective;" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "override,message",
    [
        ("views.global_size=18", "views.global_size=18 is not a multiple of the patch size 4"),
        ("views.local_size=16", "views.local_size=16 must be smaller than views.global_size=16"),
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("loss.objective=foo", "loss.objective='foo'"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, capsys, override, message):
    assert _run(tmp_path / "x", "--epochs", "1", override) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x" / "checkpoint_last.pt").exists()


def test_missing_dataset_is_one_line_error(tmp_path, capsys):
    code = main(["pretrain", "--out-dir", str(tmp_path / "y"), "--no-progress", f"data.root={tmp_path}/nothing"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no train-images-idx3-ubyte" in err and len(err.splitlines()) == 1


def test_resume_without_checkpoint(tmp_path, capsys):
    assert _run(tmp_path / "z", "--epochs", "1", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_help_mentions_defaults():
    out = subprocess.run([sys.executable, "-m", "pwself.cli", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "fashion-mnist" in out.stdout and "KEY=VALUE" in out.stdout


def test_overrides_may_come_between_and_after_flags(tmp_path):
    over = [t for t in TINY if "=" in t]
    out = tmp_path / "mixed"
    # KEY=VALUE before a flag, between flags and at the end: all applied, in order.
    argv = ["pretrain", over[0], "--epochs", "1", *over[1:5], "--out-dir", str(out), "--batch-size", "32",
            "--no-progress", *over[5:], "eval.knn_at_end=false", "seed=7"]
    assert main(argv) == 0
    saved = load_checkpoint(out)["config"]
    assert saved["seed"] == 7 and saved["data"]["kind"] == "synthetic" and saved["eval"]["knn_at_end"] is False
    with pytest.raises(SystemExit):
        main(["pretrain", "--epochs", "1", "--not-a-flag"])
    with pytest.raises(SystemExit):
        main(["report", str(out), "optim.lr=1"])  # report takes no overrides


def test_version_and_config_show_from_outside_the_checkout(tmp_path):
    import yaml

    import pwself

    out = subprocess.run([sys.executable, "-m", "pwself.cli", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"pwself {pwself.__version__}"
    out = subprocess.run([sys.executable, "-m", "pwself.cli", "config", "show", "--config", "fmnist_demo",
                          "optim.lr=0.002"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    from pwself.config import config_to_dict, load_config

    assert shown == config_to_dict(load_config("fmnist_demo", ["optim.lr=0.002"]))
    # every key has a one-line description
    keyed = [line for line in out.stdout.splitlines() if not line.startswith("#") and ":" in line]
    assert keyed and all("  # " in line for line in keyed)
    (tmp_path / "mine.yaml").write_text(out.stdout)  # saved output loads back as a config
    assert config_to_dict(load_config(tmp_path / "mine.yaml")) == shown


def test_package_metadata_does_not_pin_torch():
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    torchy = [d for d in meta["dependencies"] if d.split(">")[0].split("=")[0].split("<")[0].strip()
              in ("torch", "torchvision")]
    assert len(torchy) == 2 and not any("==" in d for d in torchy)
    assert {"tensorboard", "wandb", "hub", "test"} <= set(meta["optional-dependencies"])


def test_tensorboard_logger_writes_the_metrics_rows_as_real_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert _run(out, "--epochs", "1", "log.tensorboard=true", "eval.knn_floors=false") == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/teacher_temp", "train/n_match", "train/teacher_entropy",
            "knn/top1_k10"} <= set(tags)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    knn = json.loads((out / "knn.json").read_text())["knn"]
    assert events.Scalars("knn/top1_k10")[-1].value == pytest.approx(knn["10"]["top1"], rel=1e-6)


def test_missing_logger_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert _run(tmp_path / "w", "--epochs", "1", "log.wandb=myproject") == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'pwself[wandb]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_pretrain_ends_with_the_random_init_and_pixel_floors(tmp_path, capsys):
    assert _run(tmp_path / "f", "--epochs", "1") == 0
    printed = capsys.readouterr().out
    floors = json.loads((tmp_path / "f" / "floors.json").read_text())
    assert set(floors) == {"random_init", "pixels"} and floors["pixels"]["knn10"] > 0
    assert f"| *random init, same backbone* | 10 | {floors['random_init']['knn10']:.2f} | — |" in printed
    assert f"| *raw pixels* | 10 | {floors['pixels']['knn10']:.2f} | — |" in printed
    assert "*raw pixels*" in (tmp_path / "f" / "report.md").read_text()


def test_knn_twice_an_epoch_logs_training_time_without_evaluation(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "2", "eval.knn_every_epochs=0.5", "eval.knn_floors=false") == 0  # 3 steps an epoch
    history = [json.loads(x) for x in (out / "knn_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]  # every round(0.5 * 3) = 2 steps, not at the last (knn.json)
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert [h["epoch"] for h in history] == [round(2 / 3, 4), round(4 / 3, 4)]
    # training time grows step by step and the kNN at step 2 is not counted in it
    times = [rows[s]["train_s"] for s in range(1, 7)]
    assert times == sorted(times) and times[0] > 0
    for key in ("train_s", "cpu_s"):  # the evaluation after step 2 lies between the rows of steps 2 and 3
        assert rows[2][key] <= history[0][key] <= rows[3][key]
    assert rows[6]["cpu_s"] > 0
    assert json.loads((out / "knn.json").read_text())["train_s"] >= rows[6]["train_s"]  # + the last checkpoint
    # the learning curve of that run: both in-training points and the final one, against CPU time, with floors
    assert main(["viz-curves", f"tiny={out}", "--output", str(tmp_path / "curve.png"), "--floors"]) == 0
    curve = json.loads((tmp_path / "curve.json").read_text())
    points = curve["runs"]["tiny"]
    assert [p["step"] for p in points] == [2, 4, 6]
    assert [p["cpu_s"] for p in points] == sorted(p["cpu_s"] for p in points)
    assert points[0]["top1"] == history[0]["knn"]["10"]["top1"]
    assert set(curve["floors"]) == {"random init", "raw pixels"}
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size[0] > 500
    assert main(["viz-curves", str(tmp_path / "missing_run"), "--output", str(tmp_path / "x.png")]) == 2
