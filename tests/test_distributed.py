"""Data parallelism on CPU with gloo: a 2-process step equals one step on the combined batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pwself.step import distill_step, param_groups
from pwself.views import MultiCrop, MultiCropViews

HERE = Path(__file__).parent


def setup():
    from test_train import build_parts, tiny_config

    student, teacher, objective = build_parts(tiny_config())
    # SGD, not AdamW: Adam's first step is about lr * sign(grad), which turns rounding noise in gradients
    # that are zero in exact arithmetic (the key bias) into full-size differences.
    opt = torch.optim.SGD(param_groups(student.named_parameters()), lr=0.5)
    return student, teacher, objective, opt


def half_views(rank: int) -> MultiCropViews:
    """The views of rank ``rank``'s half of the batch (3 images each), from a generator seeded by rank."""
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.rand(3, 1, 16, 16, generator=g)
    return MultiCrop(2, 3, 16, 8)(images, g)


def concat_views(parts: list[MultiCropViews]) -> MultiCropViews:
    """Join per-rank views along the batch (fields are view-major)."""
    g, n_loc = parts[0].n_global, parts[0].n_local

    def join(name: str, n_views: int) -> torch.Tensor:
        return torch.cat([torch.cat([getattr(p, name).unflatten(0, (n_views, -1))[v] for p in parts])
                          for v in range(n_views)])

    return MultiCropViews(join("global_crops", g), join("local_crops", n_loc),
                          torch.cat([p.boxes for p in parts], 1), torch.cat([p.flips for p in parts], 1), g, n_loc)


def one_step(student, teacher, objective, opt, ranks):
    """One SGD step of ``student`` (a DistillNet, or DDP around one) on the views of ``ranks``."""
    views = concat_views([half_views(r) for r in ranks])
    out = distill_step(student, teacher, objective, views, 0.04)
    opt.zero_grad()
    out.terms["loss"].backward()  # under DDP the gradients are averaged over ranks here
    opt.step()
    objective.update_centers(out.teacher)  # under DDP the batch means are summed over ranks here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_step_equals_single_process_step_on_combined_batch(tmp_path):
    out = _torchrun([str(HERE / "ddp_worker.py"), str(tmp_path / "ddp.pt")], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    from pwself.losses import sinkhorn_knopp

    sk = sinkhorn_knopp(torch.randn(10, 6, generator=torch.Generator().manual_seed(7)), 0.1)
    torch.testing.assert_close(ddp.pop("sinkhorn_rank0"), sk[:5])  # N, sums and maximum span both ranks
    student, teacher, objective, opt = setup()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    one_step(student, teacher, objective, opt, ranks=[0, 1])
    changed = 0
    for k, v in student.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(before[k], v)
    assert changed > 10  # the step really moved the parameters
    # The centers: rank 0 saw half the batch, yet its centers are those of the combined batch.
    for k, v in objective.state_dict().items():
        assert v.abs().sum() > 0, k
        torch.testing.assert_close(ddp[f"objective.{k}"], v, rtol=1e-5, atol=1e-7, msg=k)
        assert not torch.allclose(ddp[f"rank0_alone.{k}"], v, rtol=1e-3, atol=1e-5), k


@pytest.mark.slow
def test_torchrun_pretrain_writes_once_and_evaluates(tmp_path):
    from test_cli import TINY

    out = _torchrun(["-m", "pwself.cli", "pretrain", "--out-dir", "run", "--epochs", "1", "--batch-size", "16",
                     "--no-progress", *TINY], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "run"
    ckpts = sorted(p.name for p in run.glob("checkpoint_0*.pt"))
    assert ckpts == ["checkpoint_00000003.pt"]  # 96 images / (16 x 2 ranks) = 3 steps
    state = torch.load(run / "checkpoint_00000003.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["generators"]) == 2
    assert not torch.equal(state["generators"][0], state["generators"][1])
    assert out.stdout.count("report:") == 1 and (run / "knn.json").exists()


@pytest.mark.slow
def test_sigterm_under_torchrun_checkpoints_one_agreed_step_and_auto_resume_is_exact(tmp_path):
    """torchrun forwards SIGTERM to every rank; they stop after the same step (an all-reduce of the flag), write
    one checkpoint with both ranks' generators, and a rerun with --auto-resume ends on the weights of an
    uninterrupted two-process run."""
    import signal
    import time

    from test_preemption import TINY

    args = ["-m", "pwself.cli", "pretrain", "--epochs", "4", "--batch-size", "8", "--no-progress", *TINY]
    assert _torchrun([*args, "--out-dir", "straight"], tmp_path).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args, "--out-dir", "cut"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if not list((tmp_path / "cut").glob("checkpoint_0*.pt")) or (tmp_path / "cut" / "finished.json").exists():
        pytest.skip("the run finished before the signal arrived (a very fast machine)")
    assert "stopped by SIGTERM after step" in err, err[-2000:]
    stopped = sorted((tmp_path / "cut").glob("checkpoint_0*.pt"))[-1]
    assert len(torch.load(stopped, weights_only=True)["generators"]) == 2
    assert _torchrun([*args, "--out-dir", "cut", "--auto-resume"], tmp_path).returncode == 0
    a = torch.load(tmp_path / "straight" / "checkpoint_00000024.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint_00000024.pt", weights_only=True)
    for key in ("student", "teacher"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
