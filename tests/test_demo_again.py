"""`make demo` run again: `pretrain --auto-resume` starts a run, starts over in a folder whose run wrote no
checkpoint, continues an interrupted run exactly, and shows a finished run's stored result without training."""

import pytest
import torch
from safetensors.torch import load_file
from test_cli import TINY

import pwself.train
from pwself.cli import main

# 96 images / batch 32: 3 steps an epoch, a checkpoint at each epoch's end; kNN at the end, no floors (fast).
ARGS = ["pretrain", "--batch-size", "32", "--epochs", "2", "--no-progress", "--auto-resume", *TINY,
        "eval.knn_floors=false"]


def _pretrain(out, *extra):
    return main([*ARGS, "--out-dir", str(out), *extra])


def _interrupt_after(monkeypatch, n_steps):
    """Make the run stop with Ctrl-C right after its ``n_steps``-th step (its checkpoint, if due, written)."""
    real = pwself.train._after_step

    def after_step(run, step, out, sch, prog, *rest):
        row = real(run, step, out, sch, prog, *rest)
        if prog.step == n_steps:
            raise KeyboardInterrupt
        return row

    monkeypatch.setattr(pwself.train, "_after_step", after_step)


def _weights(run):
    return load_file(run / "teacher_backbone.safetensors")


def _table(printed):
    return [line for line in printed.splitlines() if line.startswith("|")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert _pretrain(out) == 0
    return out


@pytest.mark.slow
def test_interrupted_before_the_first_checkpoint_starts_over(tmp_path, monkeypatch, capsys, uninterrupted):
    out = tmp_path / "demo"
    monkeypatch.setenv("PWSELF_AGAIN", "make demo")
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        assert _pretrain(out) == 130
    assert "interrupted; run `make demo` again to continue" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.jsonl", ".pwself.lock"}  # the case
    assert _pretrain(out) == 0
    assert not list(tmp_path.glob("demo.replaced-*"))  # nothing was worth moving aside
    for k, v in _weights(uninterrupted).items():
        assert torch.equal(_weights(out)[k], v), k


@pytest.mark.slow
def test_interrupted_after_a_checkpoint_continues_exactly(tmp_path, monkeypatch, capsys, uninterrupted):
    out = tmp_path / "demo"
    with monkeypatch.context() as m:
        _interrupt_after(m, 4)  # epoch 1's checkpoint (step 3) is on disk
        assert _pretrain(out) == 130
    err = capsys.readouterr().err
    assert "interrupted; continue with `pwself pretrain " in err and "--auto-resume` (checkpoints are kept)" in err
    assert (out / "checkpoint_00000003.pt").exists() and not (out / "checkpoint_00000006.pt").exists()
    assert _pretrain(out) == 0
    for k, v in _weights(uninterrupted).items():
        assert torch.equal(_weights(out)[k], v), k  # bit-identical to the uninterrupted run
    printed = capsys.readouterr().out
    assert _table(printed) and "report:" in printed


@pytest.mark.slow
def test_a_finished_run_shows_its_result_without_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    assert _pretrain(out) == 0
    first = capsys.readouterr().out
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(pwself.train, "train", no_training)
    monkeypatch.setattr("pwself.experiment.evaluate", no_training)
    assert _pretrain(out) == 0
    again = capsys.readouterr().out
    assert "its stored result (nothing was trained or evaluated again)" in again
    assert _table(again) == _table(first) and len(_table(first)) >= 3
    assert f"report: {out / 'report.html'}" in again
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == files  # nothing rewritten


@pytest.mark.slow
def test_a_changed_config_is_one_line_naming_the_keys_and_the_way_to_start_over(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    assert _pretrain(out) == 0
    capsys.readouterr()  # the first run's own lines (this short run's schedule notes)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setenv("PWSELF_START_OVER", "make demo-clean demo")
    assert _pretrain(out, "optim.lr=1e-3", "head.out_dim=32") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs in head.out_dim, optim.lr" in err[0]
    assert "start over with `make demo-clean demo`" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    monkeypatch.delenv("PWSELF_START_OVER")
    assert _pretrain(out, "optim.lr=1e-3") == 2  # outside make: the pwself command itself, runnable as printed
    assert "optim.lr=1e-3 --overwrite` (the old run is moved aside)" in capsys.readouterr().err


def test_auto_resume_with_resume_or_overwrite_is_refused(tmp_path, capsys):
    assert _pretrain(tmp_path / "x", "--resume") == 2
    assert "--auto-resume chooses between starting and resuming" in capsys.readouterr().err
