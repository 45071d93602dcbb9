"""End to end through the CLI on synthetic data: checkpoints, logs, resume, report, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pwself.checkpoint import load_checkpoint
from pwself.cli import main

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
    assert _run(out, "--epochs", "2", "knn_every_epochs=1") == 0
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
    assert _run(out, "--epochs", "1", "knn_at_end=false") == 0
    capsys.readouterr()
    assert _run(out, "--epochs", "1", "--resume", "optim.lr=0.1", "loss.objective=dino") == 2
    err = capsys.readouterr().err.strip()
    assert "config differs in loss.objective, optim.lr" in err and len(err.splitlines()) == 1


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
