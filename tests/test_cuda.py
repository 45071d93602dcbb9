"""GPU paths, run by scripts/gpu_check.sh on a machine with CUDA (skipped elsewhere): fp16 with a gradient
scaler, bf16, a one-process NCCL group with DistributedDataParallel, feature extraction on the device."""

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]


def _step(precision, distributed=False):
    from test_train import tiny_config

    from pwself.step import build_step

    cfg = tiny_config(**{"precision": precision})
    step = build_step(cfg, torch.device("cuda"), [0.5], [0.25], distributed=distributed)
    for g in step.optimizer.param_groups:
        g["lr"], g["weight_decay"] = 1e-3, 0.0
    before = [p.detach().clone() for p in step.model.parameters()]
    out, grad_norm = step(torch.rand(8, 1, 16, 16, device="cuda"), 0.04, 0.99, torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    assert torch.isfinite(out.terms["loss"]) and grad_norm is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, step.model.parameters()))
    return step


def test_fp16_with_grad_scaler_trains():
    step = _step("fp16")
    assert step.scaler.is_enabled() and step.scaler.get_scale() > 0


def test_bf16_autocast_trains():
    assert not _step("bf16").scaler.is_enabled()


def test_one_process_nccl_group_with_ddp():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        from torch.nn.parallel import DistributedDataParallel

        assert isinstance(_step("fp32", distributed=True).student, DistributedDataParallel)
    finally:
        dist.destroy_process_group()


def test_feature_extraction_on_the_device_matches_the_cpu():
    from pwself.data import make_synthetic
    from pwself.eval import extract_features
    from pwself.models import BackboneConfig, make_vit

    torch.manual_seed(0)
    backbone = make_vit(BackboneConfig(patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2), 16)
    ds = make_synthetic(40, 16, 1, 4)
    cpu, y_cpu = extract_features(backbone, ds, [0.5], [0.25], size=16, progress=False)
    gpu, y_gpu = extract_features(backbone.cuda(), ds, [0.5], [0.25], size=16, progress=False, device="cuda")
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
    assert torch.equal(y_cpu, y_gpu)
