"""Issue 44, items 1 and 2: a run given in steps, one line for each part of a schedule the run is too short for,
curves that always have points, and live collapse diagnostics that warn once, after a sustained window."""

import json
import logging
import math

import pytest
import torch
from test_cli import TINY

from pwself.cli import main
from pwself.config import load_config
from pwself.diagnostics import WINDOW, CollapseWatch, effective_rank
from pwself.schedules import log_interval, make_schedules, schedule_problems, total_steps


def test_a_run_in_steps_sets_every_schedules_length():
    cfg = load_config(None, ["steps=25", "epochs=1"])
    assert total_steps(cfg, 10) == 25 and len(make_schedules(cfg, 10).lr) == 25
    assert total_steps(load_config(None, ["epochs=3"]), 10) == 30


def test_each_part_too_long_for_the_run_is_one_line_naming_the_fix():
    # The README's old small-folder run: 120 photos at batch 64 for 10 epochs = 10 steps.
    cfg = load_config(None, ["epochs=10", "optim.warmup_epochs=10", "loss.warmup_teacher_temp_epochs=30",
                             "loss.warmup_teacher_temp=0.02"])
    lines = schedule_problems(cfg, steps_per_epoch=1)
    assert any(line.startswith("the lr warm-up (optim.warmup_epochs=10: 10 steps) takes all of this 10-step run: "
                               "set optim.warmup_epochs=1") for line in lines)
    assert any("loss.warmup_teacher_temp_epochs=30" in line for line in lines)
    assert any("log_every=10 would log 1 point(s)" in line and "logging every 1 step(s)" in line for line in lines)
    assert lines[0] == ("this run has 10 optimizer step(s) (1 a pass over the data at batch 64): too few to learn "
                        "measurably from a random init; give --steps 300 or more (a small folder on a CPU: "
                        "--config small_folder)")
    assert not any("too few" in line for line in schedule_problems(load_config(None, ["steps=100"]), 1))
    started = load_config(None, ["epochs=10", "backbone.init=weights.safetensors"])  # a short post-training: fine
    assert not any("too few" in line for line in schedule_problems(started, 1))
    assert schedule_problems(load_config("fmnist_demo"), steps_per_epoch=600) == []  # the demo: nothing to say
    assert log_interval(load_config(None, ["log_every=10"]), 60) == 3 and log_interval(load_config(None, []), 9) == 1


def test_effective_rank_of_known_features():
    g = torch.Generator().manual_seed(0)
    assert effective_rank(torch.randn(512, 4, generator=g)) == pytest.approx(4, abs=0.1)
    assert effective_rank(torch.randn(64, 1, generator=g) * torch.ones(1, 16)) == pytest.approx(1, abs=1e-6)
    x = torch.cat([torch.randn(256, 2, generator=g), torch.zeros(256, 6)], 1)
    assert effective_rank(x) == pytest.approx(2, abs=0.1)
    assert effective_rank(torch.ones(5, 3)) == 0.0  # one point: no spread at all


def test_the_collapse_warning_waits_for_a_window_and_comes_once():
    watch = CollapseWatch()
    seen = ["x", "x", "", "x"] + ["x"] * (WINDOW - 1) + ["x"] * 3  # a break, then a full window and more
    assert [watch.update(k) for k in seen] == [False] * (WINDOW + 2) + [True] + [False] * 3


def _run(out, *extra):
    return main(["pretrain", "--out-dir", str(out), "--batch-size", "32", "--no-progress", *TINY,
                 "eval.knn_at_end=false", "eval.knn_floors=false", *extra])


@pytest.mark.slow
def test_a_forced_uniform_collapse_warns_once_within_the_window(tmp_path, caplog):
    """A teacher temperature far too high makes every teacher distribution uniform: the warning names it and
    the fixes, once, by the WINDOW-th logged step."""
    caplog.set_level(logging.WARNING, logger="pwself")
    assert _run(tmp_path / "hot", "--epochs", "4", "loss.teacher_temp=50", "loss.warmup_teacher_temp=50") == 0
    warned = [r.getMessage() for r in caplog.records if "looks collapsed" in r.getMessage()]
    assert len(warned) == 1 and "uniform teacher" in warned[0] and "loss.centering=sinkhorn" in warned[0]
    assert f"step {WINDOW}:" in warned[0]  # log_every=1: the first window of logged rows
    rows = [json.loads(x) for x in (tmp_path / "hot" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["teacher_entropy_rel"] > 0.98 for r in rows)
    assert {"rank_cls", "rank_patch", "kl_cls"} <= set(rows[0])


@pytest.mark.slow
def test_a_forced_one_dimension_collapse_warns(tmp_path, caplog):
    """No centering and a teacher far too sharp, trained hard: one prototype takes every image."""
    caplog.set_level(logging.WARNING, logger="pwself")
    assert _run(tmp_path / "sharp", "--epochs", "6", "loss.objective=dino", "loss.center_momentum=1.0",
                "loss.teacher_temp=0.001", "loss.warmup_teacher_temp=0.001", "optim.lr=0.5",
                "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0", "optim.clip_grad=0") == 0
    rows = [json.loads(x) for x in (tmp_path / "sharp" / "metrics.jsonl").read_text().splitlines()]
    warned = [r.getMessage() for r in caplog.records if "looks collapsed" in r.getMessage()]
    assert len(warned) == 1, [(r["step"], r["teacher_mean_entropy"], r["rank_cls"]) for r in rows]


@pytest.mark.slow
def test_a_healthy_tiny_run_raises_no_alarm_and_its_curves_have_points(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pwself")
    assert _run(tmp_path / "ok", "--epochs", "2", "log_every=10") == 0
    assert not [r for r in caplog.records if "looks collapsed" in r.getMessage()]
    assert any("logging every 1 step(s) instead" in r.getMessage() for r in caplog.records)
    rows = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # 6 steps: every one logged, not only the last
    assert all(math.isfinite(r["rank_cls"]) and r["rank_cls"] > 1.5 for r in rows)
    # the effective lr of the global batch: in the log, at the end of config.yaml (a comment) and in the report
    line = "global batch 32, peak lr 6.25e-05 (optim.lr 0.0005 x 32 / 256)"
    text = (tmp_path / "ok" / "config.yaml").read_text()
    assert text.endswith(f"# derived at start (not settings): {line}\n")
    assert load_config(tmp_path / "ok" / "config.yaml").optim.lr == 0.0005
    assert line in (tmp_path / "ok" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fmnist_demo", "fmnist_compare", "fmnist_scenes", "small_folder"])
def test_the_shipped_cpu_recipes_raise_no_collapse_alarm(config, tmp_path, caplog):
    """No false alarm from the start of a shipped CPU recipe: its own loss, optimizer and head settings on
    synthetic images, 30 logged steps (six windows), no warning and every logged row under the thresholds.
    (Whole runs: RESULTS.md, "Small folders and small batches".)"""
    caplog.set_level(logging.WARNING, logger="pwself")
    assert main(["pretrain", "--config", config, "--out-dir", str(tmp_path / "run"), "--no-progress", "--steps", "30",
                 "--batch-size", "16", "data.kind=synthetic", "data.synthetic_size=64", "data.subset=0",
                 "log_every=1", "eval.knn_at_end=false", "eval.knn_floors=false", "eval.dense_every_epochs=0"]) == 0
    assert not [r for r in caplog.records if "looks collapsed" in r.getMessage()]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all(r["rank_cls"] > 1.5 and r["teacher_entropy_rel"] < 0.98 for r in rows)
