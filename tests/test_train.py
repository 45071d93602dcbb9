"""Model pieces and one full training step against the loop reference."""

import copy

import pytest
import torch
from reference import reference_loss

from pwself.config import TrainConfig, load_config
from pwself.models import DistillNet, ema_update, forward_tokens
from pwself.objectives import build_objective, objective_class
from pwself.schedules import apply_schedules, make_schedules
from pwself.step import distill_step, make_objective, param_groups
from pwself.views import MultiCrop


def tiny_config(**over) -> TrainConfig:
    items = ["backbone.embed_dim=48", "backbone.depth=2", "backbone.num_heads=3",
             "head.out_dim=7", "head.hidden_dim=32", "head.bottleneck_dim=16", "views.global_size=16",
             "views.local_size=8", "views.n_local=3"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(None, items)


def build_parts(cfg: TrainConfig, dtype=torch.float32):
    """Seeded student network, its teacher copy and the configured objective (as build_step makes them)."""
    torch.manual_seed(0)
    masked = objective_class(cfg.loss.objective).uses_mask_token
    student = DistillNet(cfg.backbone, cfg.head, cfg.views.global_size, mask_token=masked).to(dtype)
    objective = make_objective(cfg).to(dtype)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    return student, teacher, objective


def patch_center(objective):
    """The center of the patch targets (CO-SSL's are CLS outputs; DINO has none: zeros)."""
    center = getattr(objective, "patch_center", None)
    return (center if center is not None else objective.cls_center).center


def all_token_logits(student, teacher, views):
    """Head on EVERY token (the reference the gather-before-head step must equal), views of 16 and 8 px.

    Returns ``(s_cls [5, B, K], s_patch per view [B, T, K], t_cls [2, B, K], t_patch per global view)``.
    """
    b = views.batch_size

    def logits(net, crops, n):  # the CLS head on CLS tokens, the patch head (or the CLS head) on every patch
        tok = forward_tokens(net.backbone, crops)
        patches = (net.patch_head or net.head)(tok.patches)
        return net.head(tok.cls).view(n, b, -1), patches.view(n, b, tok.patches.shape[1], -1)

    with torch.no_grad():
        t_cls, t_patch = logits(teacher, views.global_crops, 2)
        s_gc, s_gp = logits(student, views.global_crops, 2)
        s_lc, s_lp = logits(student, views.local_crops, 3)
    return torch.cat([s_gc, s_lc]), [*s_gp, *s_lp], t_cls, list(t_patch)


def float32_setup(objective: str = "pwml", **over):
    """Tiny float32 student/teacher of :func:`tiny_config`, its objective and 4 images' views (2 + 3)."""
    student, teacher, obj = build_parts(tiny_config(**{"loss.objective": objective}, **over))
    views = MultiCrop(2, 3, 16, 8)(torch.rand(4, 1, 16, 16), torch.Generator().manual_seed(0))
    return student, teacher, obj, views


GRIDS = [(4, 4)] * 2 + [(2, 2)] * 3


@pytest.mark.parametrize("objective", ["dino", "pwml", "pwsl", "pwll"])
def test_distill_step_equals_reference_on_all_tokens(objective):
    student, teacher, obj = build_parts(tiny_config(**{"loss.objective": objective, "loss.lam": 0.3}), torch.float64)
    for p in teacher.parameters():  # a teacher different from the student
        p.add_(0.01 * torch.randn_like(p))
    if objective != "dino":
        obj.patch_center.center.normal_()
    views = MultiCrop(2, 3, 16, 8)(torch.rand(3, 1, 20, 20, dtype=torch.float64), torch.Generator().manual_seed(3))
    terms = distill_step(student, teacher, obj, views, 0.05).terms

    # Reference: head on EVERY token, then the loop loss picks what it needs.
    s_cls, s_patch, t_cls, t_patch = all_token_logits(student, teacher, views)
    ref = reference_loss(s_cls, t_cls, s_patch, t_patch, views.boxes,
                         views.flips, GRIDS, objective, 0.3, obj.cls_center.center[0], patch_center(obj)[0],
                         0.05, 0.1)
    torch.testing.assert_close(terms["loss"].detach().double(), ref, rtol=1e-5, atol=1e-6)  # loss runs in fp32


def test_one_step_gives_grads_to_every_student_param_and_none_to_teacher():
    student, teacher, obj, views = float32_setup()
    out = distill_step(student, teacher, obj, views, 0.04)
    terms = out.terms
    assert torch.isfinite(terms["loss"]) and terms["n_match"] > 0
    terms["loss"].backward()
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad is None for p in teacher.parameters())
    assert out.teacher.cls.shape == (2 * 4, 7) and out.teacher.patch is not None and out.teacher.patch.shape[1] == 7


def test_ema_update_formula():
    s, t, _ = build_parts(tiny_config())
    for p in s.parameters():
        p.data.add_(1.0)
    before = [p.clone() for p in t.parameters()]
    ema_update(t, s, 0.9)
    for b, tp, sp in zip(before, t.parameters(), s.parameters()):
        torch.testing.assert_close(tp, 0.9 * b + 0.1 * sp)


def test_schedules_and_last_layer_freeze():
    cfg = tiny_config(**{"epochs": 4, "batch_size": 128, "optim.lr": 1e-3, "optim.warmup_epochs": 1,
                         "optim.freeze_last_layer_epochs": 1, "loss.warmup_teacher_temp": 0.02,
                         "loss.teacher_temp": 0.06, "loss.warmup_teacher_temp_epochs": 2})
    sch = make_schedules(cfg, steps_per_epoch=10)
    assert len(sch.lr) == 40
    assert sch.lr[0] == 0 and sch.lr[10] == pytest.approx(1e-3 * 128 / 256)  # peak after warm-up, scaled
    assert sch.lr[-1] < sch.lr[20] < sch.lr[10]
    assert sch.teacher_temp[0] == pytest.approx(0.02) and sch.teacher_temp[10] == pytest.approx(0.04)
    assert sch.teacher_temp[25] == pytest.approx(0.06)
    assert sch.momentum[0] == pytest.approx(cfg.optim.momentum_teacher) and sch.momentum[-1] > 0.9999
    student, _, _ = build_parts(cfg)
    opt = torch.optim.AdamW(param_groups(student.named_parameters()))
    apply_schedules(opt, sch, 5)
    last = [g for g in opt.param_groups if g["last_layer"]]
    assert last and all(g["lr"] == 0 for g in last)
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if not g["decay"])
    apply_schedules(opt, sch, 15)
    assert all(g["lr"] == sch.lr[15] for g in opt.param_groups)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    grouped = sum(len(g["params"]) for g in opt.param_groups)
    assert grouped == len(names)


def test_feature_nn_matcher_step_matches_every_student_patch():
    student, teacher, obj, views = float32_setup(**{"loss.matcher": "feature-nn"})
    terms = distill_step(student, teacher, obj, views, 0.04).terms
    # 2 teachers x (1 other global of 16 patches + 3 locals of 4 patches) / 8 pairs = 7 matches per pair.
    assert terms["n_match"].item() == pytest.approx((2 * 16 + 6 * 4) / 8)
    terms["loss"].backward()
    obj.matcher = "nearest"
    with pytest.raises(ValueError, match="matcher"):
        distill_step(student, teacher, obj, views, 0.04)


def float64_setup(objective: str):
    """Tiny float64 student/teacher, the objective with a random CLS center, and 3 images' views (2 + 3)."""
    student, teacher, obj = build_parts(tiny_config(**{"loss.objective": objective}), torch.float64)
    obj.cls_center.center.normal_()
    views = MultiCrop(2, 3, 16, 8)(torch.rand(3, 1, 20, 20, dtype=torch.float64), torch.Generator().manual_seed(3))
    return student, teacher, obj, views


@pytest.mark.parametrize(("patch_head", "w_s"), [("shared", 1.0), ("separate", 0.3)])
def test_cossl_step_equals_reference(patch_head, w_s):
    from reference import reference_cossl

    student, teacher, obj = build_parts(tiny_config(**{"loss.objective": "cossl", "head.patch_head": patch_head,
                                                       "objectives.cossl.weight": w_s}), torch.float64)
    assert (student.patch_head is None) == (patch_head == "shared")
    obj.cls_center.center.normal_()
    views = MultiCrop(2, 3, 16, 8)(torch.rand(3, 1, 20, 20, dtype=torch.float64), torch.Generator().manual_seed(3))
    out = distill_step(student, teacher, obj, views, 0.05)
    terms = out.terms
    assert out.teacher.patch is None and terms["n_match"].item() == pytest.approx((2 * 16 + 6 * 4) / 8)
    s_cls, s_patch, t_cls, _ = all_token_logits(student, teacher, views)
    ref = reference_cossl(s_cls, t_cls, s_patch, obj.cls_center.center[0], 0.05, 0.1, w_s)
    torch.testing.assert_close(terms["loss"].detach().double(), ref, rtol=1e-5, atol=1e-6)


def loss_of(obj, s_cls, t_cls, pairs, temp, s_patch, t_patch, pair_idx, count=None, weight=1.0):
    """The objective's loss on given logits: patch pair ``n`` is student row ``n`` and teacher row ``n``."""
    from pwself.losses import PairRows, PatchInputs, distillation_loss, teacher_probs

    n = torch.arange(len(pair_idx))
    count = torch.bincount(pair_idx, minlength=len(pairs) * s_cls.shape[1]) if count is None else count
    center = obj.patch_center if hasattr(obj, "patch_center") else obj.cls_center
    patch = PatchInputs(s_patch, teacher_probs(t_patch, center, temp), PairRows(n, n, pair_idx, count, weight))
    return distillation_loss(s_cls, teacher_probs(t_cls, obj.cls_center, temp), pairs, obj.student_temp,
                             obj.term_weights, patch)


def test_cossl_patch_term_vanishes_when_patches_match_a_sharp_teacher_cls():
    # One-hot teacher CLS and student patch logits that put all mass on the same class: H ~ 0.
    obj = build_objective(tiny_config(**{"loss.objective": "cossl"}).loss, 3, 8)
    t_cls = torch.tensor([[[50.0, 0.0, 0.0]]])  # [G=1, B=1, K]
    s_cls = torch.tensor([[[50.0, 0, 0]], [[50.0, 0, 0]]])  # [V=2, B=1, K]
    s_patch = torch.tensor([[50.0, 0, 0]] * 4)
    t_rows = t_cls.flatten(0, 1).expand(4, 3)  # every patch pair's target is the one teacher CLS
    out = loss_of(obj, s_cls, t_cls, [(0, 1)], 0.04, s_patch, t_rows, torch.zeros(4, dtype=torch.long))
    assert out["patch"].item() < 1e-6 and out["loss"].item() < 1e-6
    s_patch_far = torch.tensor([[0.0, 50.0, 0]] * 4)
    far = loss_of(obj, s_cls, t_cls, [(0, 1)], 0.04, s_patch_far, t_rows, torch.zeros(4, dtype=torch.long))
    assert far["patch"].item() > 100


def test_logo_step_trains_encoder_and_affinity():
    student, teacher, obj, views = float32_setup("logo", **{"objectives.logo.weight": 0.5})
    out = distill_step(student, teacher, obj, views, 0.04)
    terms = out.terms
    assert out.teacher.patch is None and {"local_affinity", "affinity_loss"} <= set(terms)
    torch.testing.assert_close(terms["loss"].detach(),
                               terms["cls"] + 0.5 * terms["local_affinity"] + terms["affinity_loss"])
    terms["loss"].backward()
    params = [*student.named_parameters(), *obj.named_parameters()]
    missing = [n for n, p in params if p.requires_grad and p.grad is None]
    assert not missing
    # The affinity network is the objective's: the teacher has no copy of it.
    assert any(n.startswith("local_terms.affinity.") for n, _ in obj.named_parameters())
    assert not any("affinity" in n for n in teacher.state_dict())


def test_bagssl_step_equals_reference_and_bag_pooling_is_mean_of_tiles():
    from reference import reference_bagssl

    from pwself.eval.features import pool_features

    student, teacher, obj, views = float64_setup("bagssl")
    out = distill_step(student, teacher, obj, views, 0.05)
    terms = out.terms
    s_cls, _, _, _ = all_token_logits(student, teacher, views)
    with torch.no_grad():
        bag = teacher.head(forward_tokens(teacher.backbone, views.global_crops).cls.view(2, 3, -1).mean(0))
    torch.testing.assert_close(out.teacher.cls, bag)
    ref = reference_bagssl(s_cls, bag, obj.cls_center.center[0], 0.05, 0.1)
    torch.testing.assert_close(terms["loss"].detach().double(), ref, rtol=1e-5, atol=1e-6)

    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    tiles = [x[..., :8, :8], x[..., :8, 8:], x[..., 8:, :8], x[..., 8:, 8:]]
    expected = torch.stack([forward_tokens(student.backbone, t).cls for t in tiles]).mean(0)
    torch.testing.assert_close(pool_features(student.backbone, x, "bag"), expected)
    with pytest.raises(ValueError, match="multiple of 8"):
        pool_features(student.backbone, torch.rand(1, 1, 12, 12, dtype=torch.float64), "bag")


@pytest.mark.parametrize("objective", ["pwml", "pwsl", "pwll", "cossl"])
def test_patch_subset_loss_is_unbiased_exactly(objective):
    # Enumerate every subset of 8 patch pairs with its probability: E[loss] must equal the full loss.
    import itertools

    g = torch.Generator().manual_seed(1)
    obj = build_objective(tiny_config(**{"loss.objective": objective, "loss.lam": 0.3}).loss, 5, 8).double()
    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    s_cls, t_cls = rand(3, 2, 5), rand(2, 2, 5)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    s_patch, t_patch = rand(8, 5), rand(8, 5)
    pair_idx = torch.tensor([0, 0, 1, 3, 3, 3, 6, 7])  # p * B + b with B = 2
    full = loss_of(obj, s_cls, t_cls, pairs, 0.05, s_patch, t_patch, pair_idx)["loss"]
    count = torch.bincount(pair_idx, minlength=8)
    f, expected = 0.3, torch.zeros((), dtype=torch.float64)
    for keep in itertools.product([False, True], repeat=8):
        k = torch.tensor(keep)
        prob = f ** int(k.sum()) * (1 - f) ** int((~k).sum())
        out = loss_of(obj, s_cls, t_cls, pairs, 0.05, s_patch[k], t_patch[k], pair_idx[k], count=count, weight=1 / f)
        expected += prob * out["loss"]
        assert out["n_match"] == count.double().mean()
    torch.testing.assert_close(expected, full.double(), rtol=1e-5, atol=1e-6)  # the loss runs in float32


@pytest.mark.parametrize("objective", ["pwml", "cossl"])
def test_patch_fraction_runs_the_head_on_fewer_tokens_and_is_seeded(objective):
    student, teacher, obj, views = float64_setup(objective)
    rows = {}

    def head_rows(module, inputs, output):
        rows.setdefault(module, []).append(inputs[0].shape[0])

    handle = student.head.register_forward_hook(head_rows)
    with torch.no_grad():
        full = distill_step(student, teacher, obj, views, 0.05).terms
        obj.patch_fraction = 0.25
        a = distill_step(student, teacher, obj, views, 0.05, torch.Generator().manual_seed(0)).terms
        b = distill_step(student, teacher, obj, views, 0.05, torch.Generator().manual_seed(0)).terms
    handle.remove()
    n_full, n_a, n_b = rows[student.head]
    assert n_a == n_b < n_full  # fewer student tokens through the head, the same subset for one seed
    assert a["loss"] == b["loss"] and a["loss"] != full["loss"]
    assert a["n_match"] == full["n_match"]


def test_patch_fraction_is_validated():
    from pwself.config import ConfigError

    with pytest.raises(ConfigError, match="patch_fraction"):
        tiny_config(**{"loss.patch_fraction": 0}).validate()


@pytest.mark.parametrize("objective", ["pwml", "pwll", "cossl"])
def test_recompute_head_gives_the_same_loss_and_grads_with_less_saved_memory(objective):
    student, teacher, obj, views = float64_setup(objective)
    patch_center(obj).normal_()
    results = {}
    for recompute in (False, True):
        obj.recompute_head = recompute
        student.zero_grad(set_to_none=True)
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            terms = distill_step(student, teacher, obj, views, 0.05).terms
        terms["loss"].backward()
        grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
        results[recompute] = (terms["loss"].detach(), grads, sum(saved.values()))
    torch.testing.assert_close(results[True][0], results[False][0])
    assert len(results[True][1]) == len(results[False][1])
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b)
    assert results[True][2] < results[False][2]  # head activations and patch logits were not kept


@pytest.mark.parametrize("patch_head", ["separate", "split"])
@pytest.mark.parametrize("objective", ["pwml", "pwll"])
def test_a_patch_head_of_its_own_gives_the_reference_loss(patch_head, objective):
    over = {"loss.objective": objective, "loss.lam": 0.3, "head.patch_head": patch_head, "head.patch_out_dim": 5}
    student, teacher, obj = build_parts(tiny_config(**over), torch.float64)
    for p in teacher.parameters():
        p.add_(0.01 * torch.randn_like(p))
    obj.patch_center.center.normal_()
    assert obj.patch_center.center.shape == (1, 5) and obj.cls_center.center.shape == (1, 7)
    views = MultiCrop(2, 3, 16, 8)(torch.rand(3, 1, 20, 20, dtype=torch.float64), torch.Generator().manual_seed(3))
    terms = distill_step(student, teacher, obj, views, 0.05).terms
    b = views.batch_size
    with torch.no_grad():  # reference: the CLS head on CLS tokens, the patch head on EVERY patch token
        tg = forward_tokens(teacher.backbone, views.global_crops)
        sg = forward_tokens(student.backbone, views.global_crops)
        sl = forward_tokens(student.backbone, views.local_crops)
        s_cls = torch.cat([student.head(sg.cls), student.head(sl.cls)]).view(5, b, 7)
        t_cls = teacher.head(tg.cls).view(2, b, 7)
        s_patch = list(student.patch_head(sg.patches).view(2, b, 16, 5)) + list(
            student.patch_head(sl.patches).view(3, b, 4, 5))
        t_patch = list(teacher.patch_head(tg.patches).view(2, b, 16, 5))
    ref = reference_loss(s_cls, t_cls, s_patch, t_patch, views.boxes, views.flips, GRIDS, objective, 0.3,
                         obj.cls_center.center[0], obj.patch_center.center[0], 0.05, 0.1)
    torch.testing.assert_close(terms["loss"].detach().double(), ref, rtol=1e-5, atol=1e-6)
    terms["loss"].backward()
    assert student.patch_head.last_layer.parametrizations.weight.original1.grad is not None
    names = [n for n, _ in student.named_parameters()]
    assert (patch_head == "split") == (not any(n.startswith("patch_head.mlp") for n in names))  # iBOT: MLP shared


def test_cossl_patch_head_must_have_the_cls_width_and_a_patch_head_needs_a_valid_name():
    from pwself.config import ConfigError

    with pytest.raises(ConfigError, match="compared with CLS outputs of head.out_dim=7, use head.patch_out_dim=0"):
        tiny_config(**{"loss.objective": "cossl", "head.patch_head": "separate", "head.patch_out_dim": 5})
    with pytest.raises(ConfigError, match="use shared, separate or split"):
        tiny_config(**{"head.patch_head": "own"})
    with pytest.raises(ConfigError, match="needs a patch head of its own"):
        tiny_config(**{"head.patch_out_dim": 5})
