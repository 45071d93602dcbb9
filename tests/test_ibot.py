"""Masked patch distillation (iBOT, DINOv2; SPEC §7): masks, the mask token, the iBOT and PW-Self + iBOT losses
against float64 loops, KoLeo and Sinkhorn-Knopp against their formulas."""

import math

import pytest
import torch
from reference import h, reference_loss
from test_train import build_parts, tiny_config

from pwself.config import ConfigError, load_config
from pwself.losses import koleo_loss, sinkhorn_knopp
from pwself.masking import block_mask, draw_masks
from pwself.models import forward_tokens
from pwself.objectives import objective_overrides
from pwself.objectives.base import view_grids
from pwself.step import distill_step
from pwself.views import MultiCrop

GRIDS = [(4, 4)] * 2 + [(2, 2)] * 3


def test_masks_follow_dinov2s_collate_ratio_bins_and_shuffle():
    gen = torch.Generator().manual_seed(0)
    masks = draw_masks(16, (14, 14), (0.1, 0.5), 0.5, gen)
    assert masks.shape == (16, 196) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == 8  # floor(16 * 0.5) crops masked, the rest not
    # Masked crop i targets a ratio in the i-th of 8 equal bins of [0.1, 0.5]: never more cells than its bin's top.
    ratios = sorted((counts[counts > 0].double() / 196).tolist())
    tops = torch.linspace(0.1, 0.5, 9)[1:].tolist()
    assert all(r <= top + 1e-9 for r, top in zip(ratios, tops)), (ratios, tops)
    assert ratios[-1] > 0.3 and ratios[0] < 0.2  # the bins spread the ratios out
    assert not torch.equal(counts > 0, torch.arange(16) < 8)  # shuffled
    assert torch.equal(masks, draw_masks(16, (14, 14), (0.1, 0.5), 0.5, torch.Generator().manual_seed(0)))


def test_block_mask_grows_rectangles_up_to_the_target_and_half_the_grid():
    gen = torch.Generator().manual_seed(1)
    for target in (0, 3, 20, 98):
        m = block_mask((14, 14), target, gen)
        assert int(m.sum()) <= target
        if target >= 20:
            assert int(m.sum()) >= target * 0.7  # reaches about its target
    # No rectangle spans the full width or height (dinov2: w < width and h < height).
    m = block_mask((6, 6), 4, torch.Generator().manual_seed(2))
    rows, cols = m.any(1).sum(), m.any(0).sum()
    assert rows < 6 and cols < 6 and int(m.sum()) >= 1


def test_masked_cells_ignore_their_pixels_and_the_mask_token_learns():
    student, _, obj = build_parts(tiny_config(**{"loss.objective": "ibot"}))
    assert student.mask_token is not None and obj.uses_mask_token
    with torch.no_grad():
        student.mask_token.normal_()
    x = torch.rand(2, 1, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 6]] = True  # cells (0,0), (1,1), (1,2) of the 4x4 grid of 4-px patches
    y = x.clone()
    y[0, :, 0:4, 0:4] = 5.0  # change only masked pixels
    y[0, :, 4:8, 4:12] = -3.0
    a = forward_tokens(student.backbone, x, masks, student.mask_token)
    b = forward_tokens(student.backbone, y, masks, student.mask_token)
    torch.testing.assert_close(a.patches, b.patches)
    torch.testing.assert_close(a.cls, b.cls)
    unmasked = forward_tokens(student.backbone, x)
    assert not torch.allclose(a.patches[0], unmasked.patches[0])
    torch.testing.assert_close(a.patches[1], unmasked.patches[1])  # crop 1 has no mask
    a.patches.sum().backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0


def _masked_logits(net, crops, masks, n_views, b):
    tok = forward_tokens(net.backbone, crops, masks, net.mask_token if masks is not None else None)
    patches = (net.patch_head or net.head)(tok.patches)
    return net.head(tok.cls).view(n_views, b, -1), patches.view(n_views, b, tok.patches.shape[1], -1)


def reference_ibot(s_patch, t_patch, masks, patch_center, t_temp, s_temp):
    """Sum over masked crops of the mean over its masked cells of H(teacher cell, student cell), divided by the
    number of global crops (dinov2's iBOTPatchLoss.forward_masked), by loops in float64."""
    g_n, b_n = len(t_patch), t_patch[0].shape[0]
    total = 0.0
    for c in range(g_n * b_n):
        g, b = divmod(c, b_n)
        cells = masks[c].nonzero().flatten().tolist()
        if cells:
            total = total + sum(h(t_patch[g][b, t], patch_center, t_temp, s_patch[g][b, t], s_temp)
                                for t in cells) / len(cells)
    return total / (g_n * b_n)


@pytest.mark.parametrize("objective,patch_head", [("ibot", "shared"), ("ibot", "separate"), ("pwml_ibot", "shared")])
def test_ibot_losses_equal_the_loop_reference(objective, patch_head):
    cfg = tiny_config(**{"loss.objective": objective, "head.patch_head": patch_head,
                         f"objectives.{objective}.weight": 0.7})
    student, teacher, obj = build_parts(cfg, torch.float64)
    for p in teacher.parameters():
        p.add_(0.01 * torch.randn_like(p))
    obj.patch_center.center.normal_()
    obj.cls_center.center.normal_()
    with torch.no_grad():
        student.mask_token.normal_()
    views = MultiCrop(2, 3, 16, 8)(torch.rand(4, 1, 20, 20, dtype=torch.float64), torch.Generator().manual_seed(3))
    grids = view_grids(views, 4)
    masks = obj.select(views, grids, [], torch.Generator().manual_seed(9)).masked.masks
    assert masks.any()
    terms = distill_step(student, teacher, obj, views, 0.05, torch.Generator().manual_seed(9)).terms

    b = views.batch_size
    with torch.no_grad():
        t_cls, t_patch = _masked_logits(teacher, views.global_crops, None, 2, b)
        s_gc, s_gp = _masked_logits(student, views.global_crops, masks, 2, b)
        s_lc, s_lp = _masked_logits(student, views.local_crops, None, 3, b)
    s_cls, s_patch = torch.cat([s_gc, s_lc]), [*s_gp, *s_lp]
    center, pcenter = obj.cls_center.center[0], obj.patch_center.center[0]
    ibot = reference_ibot(s_patch, t_patch, masks, pcenter, 0.05, 0.1)
    base = "dino" if objective == "ibot" else "pwml"
    ref = reference_loss(s_cls, t_cls, s_patch, list(t_patch), views.boxes, views.flips, GRIDS, base, 0.5, center,
                         pcenter, 0.05, 0.1)
    torch.testing.assert_close(terms["ibot"].double(), ibot, rtol=1e-9, atol=1e-12)
    # PWML's term weights 1 / (1 + n) are float32 (as in every PW-Self run): 1e-8 relative, not 1e-12.
    rtol = 1e-9 if objective == "ibot" else 1e-7
    torch.testing.assert_close(terms["loss"].detach().double(), ref + 0.7 * ibot, rtol=rtol, atol=1e-12)


def test_koleo_equals_its_formula():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xn = x / x.norm(dim=1, keepdim=True)
    ref = 0.0
    for i in range(9):
        j = max((k for k in range(9) if k != i), key=lambda k: float(xn[i] @ xn[k]))
        ref += -math.log(float((xn[i] - xn[j] + 1e-8).norm()) + 1e-8)  # torch's pairwise_distance adds eps
    assert float(koleo_loss(x)) == pytest.approx(ref / 9, rel=1e-12)


def test_sinkhorn_knopp_equals_the_loop_and_dinov2s_formula():
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    temp, n, k = 0.3, 6, 4
    q = [[math.exp(float(z[b, j]) / temp) for b in range(n)] for j in range(k)]  # Q = exp(z / tau)^T, [K, N]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(3):
        q = [[v / sum(row) / k for v in row] for row in q]
        cols = [sum(q[j][b] for j in range(k)) for b in range(n)]
        q = [[q[j][b] / cols[b] / n for b in range(n)] for j in range(k)]
    ref = torch.tensor(q, dtype=torch.float64).T * n
    got = sinkhorn_knopp(z, temp)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got.sum(1), torch.ones(n, dtype=torch.float64))
    # dinov2 exponentiates without subtracting the maximum: the same targets.
    q2 = torch.exp(z / temp).T
    q2 /= q2.sum()
    for _ in range(3):
        q2 /= q2.sum(1, keepdim=True) * k
        q2 /= q2.sum(0, keepdim=True) * n
    torch.testing.assert_close(got, (q2 * n).T, rtol=1e-12, atol=1e-15)


def test_sinkhorn_centering_replaces_the_center_in_the_loss():
    cfg = tiny_config(**{"loss.objective": "pwml", "loss.centering": "sinkhorn"})
    student, teacher, obj = build_parts(cfg, torch.float64)
    obj.cls_center.center.normal_()  # unused under Sinkhorn-Knopp: the loss does not move
    views = MultiCrop(2, 3, 16, 8)(torch.rand(3, 1, 20, 20, dtype=torch.float64), torch.Generator().manual_seed(3))
    a = distill_step(student, teacher, obj, views, 0.05).terms["loss"].detach()
    obj.cls_center.center.normal_()
    obj.patch_center.center.normal_()
    b = distill_step(student, teacher, obj, views, 0.05).terms["loss"].detach()
    assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_koleo_is_added_with_its_weight():
    student, teacher, obj = build_parts(tiny_config(**{"loss.objective": "dino", "loss.koleo_weight": 0.1}),
                                        torch.float64)
    views = MultiCrop(2, 3, 16, 8)(torch.rand(5, 1, 20, 20, dtype=torch.float64), torch.Generator().manual_seed(3))
    out = distill_step(student, teacher, obj, views, 0.05)
    tokens = forward_tokens(student.backbone, views.global_crops).cls.view(2, 5, -1)
    koleo = koleo_loss(tokens[0]) + koleo_loss(tokens[1])
    torch.testing.assert_close(out.terms["koleo"], koleo.detach())
    loss, cls = float(out.terms["loss"].detach()), float(out.terms["cls"].detach())
    assert loss == pytest.approx(cls + 0.1 * float(koleo.detach()), rel=1e-12)


def test_recipe_and_options_are_validated_in_one_line():
    cfg = load_config(None, objective_overrides("dinov2"))
    assert (cfg.loss.objective, cfg.loss.koleo_weight, cfg.head.patch_head) == ("ibot", 0.1, "separate")
    assert (cfg.loss.centering, cfg.recipe, cfg.method) == ("sinkhorn", "dinov2", "dinov2")  # issue 39, item 6
    ema = load_config(None, objective_overrides("dinov2_ema"))
    assert (ema.loss.centering, ema.method) == ("center", "dinov2_ema")
    assert load_config(None, [*objective_overrides("dinov2"), *objective_overrides("dino")]).method == "dino"
    with pytest.raises(ConfigError, match="recipe='dinov3': use dinov2 or dinov2_ema"):
        load_config(None, ["recipe=dinov3"])
    with pytest.raises(ConfigError, match=r"objectives.ibot.mask_ratio=\[0.5, 0.2\] must be \[low, high\]"):
        load_config(None, ["loss.objective=ibot", "objectives.ibot.mask_ratio=[0.5,0.2]"])
    with pytest.raises(ConfigError, match="use loss.matcher=geometric"):
        load_config(None, ["loss.objective=pwml_ibot", "loss.matcher=feature-nn"])
    with pytest.raises(ConfigError, match="loss.centering='sk': use center or sinkhorn"):
        load_config(None, ["loss.centering=sk"])


TINY_CLI = ["views.global_size=16", "views.local_size=8", "views.n_local=2", "backbone.patch_size=4",
            "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2", "head.out_dim=16",
            "head.hidden_dim=32", "head.bottleneck_dim=16", "log_every=1", "eval.knn_at_end=false"]


@pytest.mark.parametrize("objective,data", [("ibot", "synthetic"), ("dinov2", "folder"), ("pwml_ibot", "folder")])
def test_masked_objectives_train_end_to_end_from_the_cli(objective, data, tmp_path):
    """`pwself pretrain --objective ibot|dinov2|pwml_ibot` trains on synthetic data and on a folder of RGB photos;
    the masked term is logged and the export is a plain timm ViT (no mask token)."""
    import json

    import numpy as np
    import timm
    from PIL import Image

    from pwself.cli import main

    if data == "folder":
        (tmp_path / "photos").mkdir()
        rng = np.random.default_rng(0)
        for k, (w, h) in enumerate([(60, 40), (32, 48), (50, 50)] * 3):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{k}.jpg")
        source = ["data.kind=folder", f"data.root={tmp_path / 'photos'}", "data.num_workers=0"]
    else:
        source = ["data.kind=synthetic", "data.synthetic_size=16"]
    out = tmp_path / "run"
    argv = ["pretrain", "--objective", objective, "--epochs", "1", "--batch-size", "4", "--out-dir", str(out),
            "--no-progress", *source, *TINY_CLI]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == (16 if data == "synthetic" else 9) // 4 and all(math.isfinite(r["ibot"]) for r in rows)
    if objective == "dinov2":
        assert all(r["koleo"] != 0 for r in rows)
    saved = (out / "config.yaml").read_text()
    assert "objective: ibot" in saved or "objective: pwml_ibot" in saved
    if objective == "dinov2":  # the name the user chose is what the run says it is (issue 39, item 6)
        assert "recipe: dinov2" in saved and "centering: sinkhorn" in saved
        assert "objective dinov2," in (out / "report.md").read_text()
    assert main(["export", str(out), "--format", "safetensors", str(tmp_path / "b.safetensors")]) == 0
    channels = 3 if data == "folder" else 1
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=32, depth=1, num_heads=2, in_chans=channels)
    from safetensors.torch import load_file

    vit.load_state_dict(load_file(tmp_path / "b.safetensors"))  # strict: no mask token, nothing missing


def test_koleo_and_sinkhorn_show_in_config_show_with_their_meaning(capsys):
    from pwself.cli import main

    assert main(["config", "show"]) == 0
    text = capsys.readouterr().out
    for key in ("koleo_weight: 0.0  # Weight of the KoLeo", "centering: center  # Teacher targets centred by an EMA",
                "sinkhorn_iterations: 3  # Sinkhorn-Knopp iterations", "mask_ratio:"):
        assert key in text, key
