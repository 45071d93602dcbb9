"""Non-finite losses are skipped, then stop the run with the last good checkpoint intact; bf16 on CPU."""

import json

import pytest
import torch
from test_cli import TINY

import pwself.step as step_mod
from pwself.cli import main
from pwself.run.checkpoint import load_checkpoint


def _nan_at(monkeypatch, bad_steps):
    real = step_mod.distill_step
    calls = {"n": 0}

    def fake(*args, **kwargs):
        out = real(*args, **kwargs)
        if bad_steps == "all" or calls["n"] in bad_steps:
            out = step_mod.StepOutput(dict(out.terms, loss=out.terms["loss"] * float("nan")), out.teacher)
        calls["n"] += 1
        return out

    monkeypatch.setattr(step_mod, "distill_step", fake)


def _run(out, *extra):
    flags = [x for x in extra if "=" not in x]
    over = [x for x in extra if "=" in x]
    return main(["pretrain", "--out-dir", str(out), "--batch-size", "32", "--no-progress", *flags, *TINY,
                 "eval.knn_at_end=false", *over])


@pytest.mark.slow
def test_isolated_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {1, 4})
    assert _run(tmp_path / "r", "--epochs", "2") == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["skipped_steps"] == 2
    assert load_checkpoint(tmp_path / "r")["skipped_steps"] == 2


@pytest.mark.slow
def test_nan_in_a_row_stops_with_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    assert _run(tmp_path / "clean", "--epochs", "2") == 0
    good = load_checkpoint(tmp_path / "clean" / "checkpoint_00000003.pt")  # the same run before any NaN
    _nan_at(monkeypatch, set(range(3, 6)))  # every step of epoch 2 (3 steps an epoch)
    assert _run(out, "--epochs", "2", "optim.max_nonfinite_steps=1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: the run's own warnings
    assert err.startswith("pwself pretrain: error:") and "2 steps in a row" in err
    assert "resume from the last good checkpoint" in err and "checkpoint_00000003.pt" in err
    after = load_checkpoint(out)
    assert after["step"] == 3
    for k, v in good["student"].items():
        assert torch.equal(v, after["student"][k])


def test_bf16_autocast_on_cpu_trains(tmp_path):
    assert _run(tmp_path / "b", "--epochs", "1", "precision=bf16") == 0
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[-1]["skipped_steps"] == 0


def test_fp16_needs_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert _run(tmp_path / "f", "--epochs", "1", "precision=fp16") == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err


def test_collapse_monitor_names_both_collapses():
    import math

    from pwself.diagnostics import collapse_kind

    k = 256
    assert "uniform" in collapse_kind(0.99 * math.log(k), 0.99 * math.log(k), k)
    assert "one dimension" in collapse_kind(0.01, 0.05, k)
    assert "nearly the same CLS feature" in collapse_kind(2.0, 5.0, k, rank_cls=1.1)
    assert collapse_kind(2.0, 5.0, k) == "" and collapse_kind(2.0, 5.0, k, rank_cls=6.0) == ""


def test_host_rng_state_survives_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from pwself.train import _host_rng, _set_host_rng

    random.seed(3)
    np.random.seed(4)
    torch.save({"s": _host_rng()}, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand())
    _set_host_rng(torch.load(tmp_path / "s.pt", weights_only=True)["s"])
    assert (random.random(), np.random.rand()) == expected
