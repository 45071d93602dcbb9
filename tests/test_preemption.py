"""Preemption (issue 39, item 8): SIGTERM or SIGUSR1 ends the step in progress, writes a checkpoint, prints the
command that continues, and exits 128 + the signal; continuing gives the weights of an uninterrupted run bit for
bit. A time-based checkpoint interval bounds what a hard kill loses."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pwself.cli import main
from pwself.run.checkpoint import load_checkpoint
from pwself.step import TrainStep

TINY = ["data.kind=synthetic", "data.synthetic_size=96", "views.global_size=16", "views.local_size=8",
        "views.n_local=2", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2", "head.out_dim=16",
        "head.hidden_dim=32", "head.bottleneck_dim=16", "log_every=1", "eval.knn_floors=false", "keep_checkpoints=0",
        "eval.knn_at_end=false"]


def _argv(out, *extra):
    return ["pretrain", "--out-dir", str(out), "--batch-size", "16", "--epochs", "2", "--no-progress", *TINY, *extra]


def _same_weights(a, b):
    for key in ("student", "teacher", "objective", "optimizer"):
        assert a["step"] == b["step"]
    for key in ("student", "teacher", "objective"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


@pytest.mark.parametrize("signum,at", [(signal.SIGTERM, 4), pytest.param(signal.SIGUSR1, 2, marks=pytest.mark.slow)])
def test_a_stop_signal_checkpoints_the_step_and_auto_resume_continues_exactly(tmp_path, monkeypatch, capsys, signum,
                                                                              at):
    assert main(_argv(tmp_path / "straight")) == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint_00000012.pt")

    calls = {"n": 0}
    real = TrainStep.__call__

    def step_then_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signum)  # arrives during the step: the step still finishes
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", step_then_signal)
    out = tmp_path / "cut"
    assert main(_argv(out)) == 128 + signum
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step {at}: checkpoint {out / f'checkpoint_{at:08d}.pt'} written" in err
    assert f"continue with `pwself {' '.join(_argv(out)[:4])}" in err and "--auto-resume`" in err
    assert not (out / "finished.json").exists() and (out / f"checkpoint_{at:08d}.pt").exists()
    monkeypatch.setattr(TrainStep, "__call__", real)
    assert main([*_argv(out), "--auto-resume"]) == 0
    _same_weights(straight, load_checkpoint(out / "checkpoint_00000012.pt"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are the caller's again


def test_the_time_based_interval_checkpoints_between_epoch_ends(tmp_path):
    assert main(_argv(tmp_path / "run", "checkpoint_every_minutes=1e-9")) == 0
    steps = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "run").glob("checkpoint_0*.pt"))
    assert steps == list(range(1, 13))  # every step here; the default 10 minutes bounds a hard kill's loss
    assert main(_argv(tmp_path / "off", "checkpoint_every_minutes=0")) == 0
    assert sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "off").glob("checkpoint_0*.pt")) == [6, 12]


@pytest.mark.slow
def test_sigterm_from_outside_at_a_random_step_then_auto_resume_is_bit_exact(tmp_path):
    """A real SIGTERM to the CLI process (as SLURM or a cloud sends it), at a step the test does not choose. Every
    run is a process of its own with one thread (float32 sums depend on the thread count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "pwself.cli"]
    assert subprocess.run([*cli, *_argv(tmp_path / "straight", "--epochs", "3")], env=env).returncode == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint_00000018.pt")
    out = tmp_path / "cut"
    proc = subprocess.Popen([*cli, *_argv(out, "--epochs", "3")], env=env, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (a very fast machine)")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step" in err and "--auto-resume" in err
    assert subprocess.run([*cli, *_argv(out, "--epochs", "3"), "--auto-resume"], env=env).returncode == 0
    _same_weights(straight, load_checkpoint(out / "checkpoint_00000018.pt"))
