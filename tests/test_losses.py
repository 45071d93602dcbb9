"""Losses against the loop-based reference, gradients, centers and degenerate inputs."""

import pytest
import torch
import torch.nn.functional as F
from reference import reference_loss

from pwself.config import ConfigError, LossConfig, load_config
from pwself.losses import (
    Center,
    PairRows,
    PatchInputs,
    distillation_loss,
    pair_targets,
    target_cross_entropy,
    teacher_probs,
    view_pairs,
)
from pwself.matching import match_views
from pwself.objectives import build_objective, objective_class
from pwself.views import MultiCrop


def make_objective(objective, k, lam=0.5, student_temp=0.1, center_momentum=0.9):
    return build_objective(LossConfig(objective=objective, lam=lam, student_temp=student_temp,
                                      center_momentum=center_momentum), k, 8)


def library_loss(obj, s_cls, t_cls, pairs, temp, s_patch=None, t_patch=None, pair_idx=None):
    """The objective's loss on given logits, patch pair ``n`` being student row ``n`` and teacher row ``n``."""
    patch = None
    if s_patch is not None:
        n = torch.arange(len(pair_idx))
        count = torch.bincount(pair_idx, minlength=len(pairs) * s_cls.shape[1])
        patch = PatchInputs(s_patch, teacher_probs(t_patch, obj.patch_center, temp), PairRows(n, n, pair_idx, count))
    return distillation_loss(s_cls, teacher_probs(t_cls, obj.cls_center, temp), pairs, obj.student_temp,
                             obj.term_weights, patch)



def _setup(seed, batch=3, n_global=2, n_local=3, k=5):
    g = torch.Generator().manual_seed(seed)
    mc = MultiCrop(n_global, n_local, global_size=16, local_size=8, flip_p=0.5)
    views = mc(torch.rand(batch, 1, 20, 20, generator=g), g)
    grids = [(4, 4)] * n_global + [(2, 2)] * n_local
    v = n_global + n_local
    s_cls = torch.randn(v, batch, k, generator=g, dtype=torch.float64)
    t_cls = torch.randn(n_global, batch, k, generator=g, dtype=torch.float64)
    s_patch = [torch.randn(batch, grids[j][0] * grids[j][1], k, generator=g, dtype=torch.float64) for j in range(v)]
    t_patch = [torch.randn(batch, 16, k, generator=g, dtype=torch.float64) for _ in range(n_global)]
    return views, grids, s_cls, t_cls, s_patch, t_patch


def _library_loss(obj, views, grids, s_cls, t_cls, s_patch, t_patch, t_temp):
    pairs = view_pairs(views.n_global, views.n_global + views.n_local)
    matched = match_views(views.boxes, views.flips, grids, pairs)
    t_tok, s_tok, pair_idx, sample = matched.teacher_token, matched.student_token, matched.pair_index, matched.sample
    pi = torch.tensor([i for i, _ in pairs])[pair_idx // views.batch_size]
    pj = torch.tensor([j for _, j in pairs])[pair_idx // views.batch_size]
    sp = torch.stack([s_patch[j][b, t] for j, b, t in zip(pj.tolist(), sample.tolist(), s_tok.tolist())]) \
        if len(s_tok) else torch.zeros(0, s_cls.shape[-1], dtype=s_cls.dtype)
    tp = torch.stack([t_patch[i][b, t] for i, b, t in zip(pi.tolist(), sample.tolist(), t_tok.tolist())]) \
        if len(t_tok) else torch.zeros(0, s_cls.shape[-1], dtype=s_cls.dtype)
    if not hasattr(obj, "patch_center"):  # CLS only
        return library_loss(obj, s_cls, t_cls, pairs, t_temp)
    return library_loss(obj, s_cls, t_cls, pairs, t_temp, sp, tp, pair_idx)


@pytest.mark.parametrize("objective,lam", [("dino", 0.5), ("pwml", 0.5), ("pwsl", 0.5), ("pwll", 0.2), ("pwll", 0.9)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_reference(objective, lam, seed):
    views, grids, s_cls, t_cls, s_patch, t_patch = _setup(seed)
    crit = make_objective(objective, 5, lam).double()
    crit.cls_center.center.normal_(generator=torch.Generator().manual_seed(seed + 10))
    patch_center = torch.zeros(1, 5, dtype=torch.float64).normal_(generator=torch.Generator().manual_seed(seed + 20))
    if hasattr(crit, "patch_center"):
        crit.patch_center.center.copy_(patch_center)
    for x in [s_cls, *s_patch]:
        x.requires_grad_(True)
    got = _library_loss(crit, views, grids, s_cls, t_cls, s_patch, t_patch, 0.05)["loss"]
    got_grads = torch.autograd.grad(got, [s_cls, *s_patch], allow_unused=True, materialize_grads=True)
    ref = reference_loss(s_cls, t_cls, s_patch, t_patch, views.boxes, views.flips, grids, objective, lam,
                         crit.cls_center.center[0], patch_center[0], 0.05, 0.1)
    ref_grads = torch.autograd.grad(ref, [s_cls, *s_patch], allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)
    if objective == "dino":
        assert all(gr.abs().sum() == 0 for gr in got_grads[1:])


def test_pair_count_matches_paper():
    assert len(view_pairs(2, 10)) == 18  # 2 global + 8 local: 2 * 10 - 2
    assert (0, 0) not in view_pairs(2, 10) and (1, 1) not in view_pairs(2, 10)


def test_term_weights_hand_values():
    h_cls = torch.tensor([[1.0, 2.0]])
    s = torch.tensor([[3.0, 0.0]])
    n = torch.tensor([[2, 0]])

    def combined(objective, lam=0.5):
        a, c = make_objective(objective, 3, lam).term_weights(n)
        return (a * h_cls + c * s).mean().item()

    assert combined("dino") == pytest.approx(1.5)
    assert combined("pwml") == pytest.approx(((1 + 3) / 3 + 2) / 2)
    assert combined("pwsl") == pytest.approx((4 + 2) / 2)
    assert combined("pwll", 0.2) == pytest.approx((0.2 * 1 + 0.8 * 1.5 + 2) / 2)


def test_pair_targets_sum_weighted_teacher_rows_per_student_row():
    g = torch.Generator().manual_seed(0)
    t_probs = torch.softmax(torch.randn(4, 6, generator=g), -1)
    s_rows, t_rows = torch.tensor([0, 2, 0, 1, 2, 2]), torch.tensor([3, 0, 1, 1, 0, 2])
    weights, other = torch.rand(2, 6, generator=g)
    out, out_other = pair_targets(t_probs, s_rows, t_rows, (weights, other), 4)  # row 3 has no pair: zeros
    for w, got in ((weights, out), (other, out_other)):
        expected = torch.zeros(4, 6)
        for n in range(6):
            expected[s_rows[n]] += w[n] * t_probs[t_rows[n]]
        torch.testing.assert_close(got, expected)
    # The identity the loss relies on: sum_n w_n H_n = -sum_u <Q_u, log_softmax(s_u)>.
    log_p = F.log_softmax(torch.randn(4, 6, generator=g), -1)
    h = -(t_probs[t_rows] * log_p[s_rows]).sum(-1)
    torch.testing.assert_close(-(out * log_p).sum(), (weights * h).sum())


def test_target_cross_entropy_value_and_handwritten_backward():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target, other = torch.rand(2, 4, 7, generator=g, dtype=torch.float64)
    expected = [-(t * F.log_softmax(logits / 0.3, -1)).sum() for t in (target, other)]
    loss, reported = target_cross_entropy(logits, target, 0.3, other)
    torch.testing.assert_close(torch.stack([loss, reported]), torch.stack(expected))
    assert not reported.requires_grad
    assert torch.autograd.gradcheck(lambda z: target_cross_entropy(z, target, 0.3)[0], (logits,))
    # float32 logits and targets (as pair_targets gives them) go through the same path
    (loss32,) = target_cross_entropy(logits.detach().float(), target.float(), 0.3)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32, expected[0].float())


def test_no_match_gives_finite_loss_with_graph():
    crit = make_objective("pwml", 4)
    s = torch.randn(2, 3, 4, requires_grad=True)
    out = library_loss(crit, s, torch.randn(1, 3, 4), view_pairs(1, 2), 0.04, torch.zeros(0, 4), torch.zeros(0, 4),
                       torch.zeros(0, dtype=torch.long))
    assert torch.isfinite(out["loss"]) and out["n_match"] == 0
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()


def test_center_ema_and_empty_update():
    c = Center(3, momentum=0.9)
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    c.update(x)
    torch.testing.assert_close(c.center, torch.tensor([[0.2, 0.2, 0.2]]))
    c.update(torch.zeros(0, 3))
    torch.testing.assert_close(c.center, torch.tensor([[0.2, 0.2, 0.2]]))


def test_centers_are_separate_and_explicit():
    from pwself.models import HeadOutput

    crit = make_objective("pwml", 3, center_momentum=0.5)
    t_cls, t_patch = torch.ones(2, 4, 3), torch.full((5, 3), 4.0)
    before = crit.cls_center.center.clone()
    library_loss(crit, torch.randn(3, 4, 3), t_cls, view_pairs(2, 3), 0.04)
    assert torch.equal(crit.cls_center.center, before)  # the loss never updates the centers
    crit.update_centers(HeadOutput(t_cls.flatten(0, 1), torch.zeros(8, 2), t_patch))
    torch.testing.assert_close(crit.cls_center.center, torch.full((1, 3), 0.5))
    torch.testing.assert_close(crit.patch_center.center, torch.full((1, 3), 2.0))


def test_bad_objective_and_lambda():
    with pytest.raises(ValueError, match="unknown objective"):
        objective_class("pwxx")
    with pytest.raises(ConfigError, match="loss.objective='pwxx'"):
        load_config(None, ["loss.objective=pwxx"])
    with pytest.raises(ConfigError, match="loss.lam"):
        load_config(None, ["loss.objective=pwll", "loss.lam=1.5"])


def test_logo_local_term_alone_pushes_same_image_local_views_apart():
    from pwself.objectives.logo import LoGoAffinity

    torch.manual_seed(0)
    # 2 local views x 8 images: the two views of an image start close, images differ from each other.
    base = torch.randn(1, 8, 16)
    local = (base + 0.1 * torch.randn(2, 8, 16)).requires_grad_(True)
    phi = LoGoAffinity(16, hidden=64)
    opt_z = torch.optim.SGD([local], lr=0.5)
    opt_phi = torch.optim.Adam(phi.parameters(), lr=1e-2)

    def same_image_cos():
        return F.cosine_similarity(local[0], local[1], dim=-1).mean().item()

    before = same_image_cos()
    for _ in range(150):
        encoder_term, affinity_loss = phi.terms(local)
        opt_z.zero_grad()
        opt_phi.zero_grad()
        (encoder_term + affinity_loss).backward()
        opt_z.step()
        opt_phi.step()
    assert same_image_cos() < before - 0.2


def test_logo_terms_are_the_papers_eq6_by_loops():
    # Eq. 6: the affinity network maximizes E[f(z1, z2)] - E[f(z1, z-)]; the encoder minimizes E[f(z1, z2)].
    from pwself.objectives.logo import LoGoAffinity

    torch.manual_seed(1)
    phi = LoGoAffinity(8, hidden=16).double().eval()  # eval: no power iteration between the calls
    local = torch.randn(3, 4, 8, dtype=torch.float64)  # [L, B, D]
    same, other = [], []
    for a in range(3):
        for b in range(a + 1, 3):
            for n in range(4):  # the negative: view b of the previous image
                same.append(phi(local[a, n][None], local[b, n][None])[0])
                other.append(phi(local[a, n][None], local[b, (n - 1) % 4][None])[0])
    encoder_term, affinity_loss = phi.terms(local)
    torch.testing.assert_close(encoder_term, torch.stack(same).mean())
    torch.testing.assert_close(affinity_loss, torch.stack(other).mean() - torch.stack(same).mean())


def test_logo_terms_route_gradients_to_their_own_side():
    from pwself.objectives.logo import LoGoAffinity

    phi = LoGoAffinity(8, hidden=16)
    local = torch.randn(3, 4, 8, requires_grad=True)
    encoder_term, affinity_loss = phi.terms(local)
    grads_phi = torch.autograd.grad(encoder_term, list(phi.parameters()), allow_unused=True)
    assert all(g is None for g in grads_phi)  # the encoder term does not train the affinity network
    assert torch.autograd.grad(encoder_term, local)[0].abs().sum() > 0
    local2 = torch.randn(3, 4, 8, requires_grad=True)
    _, affinity_loss = phi.terms(local2)
    affinity_loss.backward()
    assert local2.grad is None  # the affinity loss does not move the representations
    assert all(p.grad is not None for p in phi.parameters())
    with pytest.raises(ValueError, match="at least 2 local views"):
        phi.terms(torch.randn(1, 4, 8))


def test_center_is_a_per_column_ema_worked_by_hand():
    """Columns with different means (a single overall mean, or a mean over the wrong axis, fails here)."""
    c = Center(3, momentum=0.9)
    c.update(torch.tensor([[1.0, 2.0, 3.0], [3.0, 6.0, 1.0]]))  # column means 2, 4, 2
    torch.testing.assert_close(c.center, torch.tensor([[0.2, 0.4, 0.2]]))
    c.update(torch.tensor([[0.0, 0.0, 10.0]]))  # 0.9 * C + 0.1 * row
    torch.testing.assert_close(c.center, torch.tensor([[0.18, 0.36, 1.18]]))
    c.update(torch.tensor([[1.0, 1.0, 1.0]] * 3 + [[5.0, -3.0, 1.0]]))  # every row counts once: means 2, 0, 1
    torch.testing.assert_close(c.center, torch.tensor([[0.362, 0.324, 1.162]]))


@pytest.mark.parametrize("objective", ["dino", "pwml"])
def test_a_training_step_moves_each_center_to_the_ema_of_its_teacher_outputs(objective):
    """One TrainStep: C <- m C + (1 - m) mean(teacher outputs of the step), for the CLS center and (PW-Self) the
    patch center, from a non-zero start."""
    from test_train import tiny_config

    from pwself.step import build_step

    cfg = tiny_config(**{"loss.objective": objective, "loss.center_momentum": 0.7})
    step = build_step(cfg, torch.device("cpu"), [0.5], [0.25])
    centers = {"cls": step.objective.cls_center}
    if objective == "pwml":
        centers["patch"] = step.objective.patch_center
    start = {}
    for name, c in centers.items():
        c.center.copy_(torch.linspace(-1, 1, c.center.shape[1])[None])
        start[name] = c.center.clone()
    out, grad_norm = step(torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), 0.04, 0.99,
                          torch.Generator().manual_seed(1))
    assert grad_norm is not None
    for name, c in centers.items():
        rows = out.teacher.cls if name == "cls" else out.teacher.patch
        assert rows.shape[0] > 1
        torch.testing.assert_close(c.center, 0.7 * start[name] + 0.3 * rows.double().mean(0, keepdim=True).float())
