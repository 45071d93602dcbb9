"""pwself's losses against lightly's (issue 45): an implementation written by someone else, on the same tensors.

lightly (the ``peers`` extra, pinned in ``pyproject.toml``; ``make test`` installs it) is a test-only dependency:
without it this module is skipped with one line. Everything runs in float64, where the two agree to rounding;
the one place they deliberately differ (Sinkhorn-Knopp's overflow in float32) is pinned below with its reason.
"""

from types import SimpleNamespace

import pytest
import torch

lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is not installed (pip install -e '.[peers]')")
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn  # noqa: E402

from pwself.config import LossConfig  # noqa: E402
from pwself.losses import koleo_loss, sinkhorn_knopp  # noqa: E402
from pwself.models import HeadOutput, MaskedCells, Selection, portable_init  # noqa: E402
from pwself.objectives import build_objective  # noqa: E402
from pwself.objectives.ibot import IBOTOptions, masked_cells  # noqa: E402
from pwself.views import MultiCrop  # noqa: E402

# Temperatures exact in float32: lightly turns the teacher temperature into a float32 tensor.
T_TEACHER, T_STUDENT, CENTER_M = 0.0625, 0.125, 0.75
K, B, G, L = 7, 5, 2, 3


def _views(seed: int):
    g = torch.Generator().manual_seed(seed)
    return MultiCrop(G, L, global_size=16, local_size=8, flip_p=0.5)(torch.rand(B, 1, 20, 20, generator=g), g)


def _objective(name: str, **options):
    loss = LossConfig(objective=name, student_temp=T_STUDENT, center_momentum=CENTER_M)
    own = SimpleNamespace(**{name: IBOTOptions(**options)}) if options else None  # the `objectives` section
    return build_objective(loss, K, 8, options=own).double()


def test_dino_loss_and_its_center_agree_with_lightly_over_three_steps():
    """The (teacher global, student view) pairs without a view teaching itself, the mean over pairs and samples,
    the center used before its update and updated from every teacher row: lightly's ``DINOLoss`` step by step."""
    ours = _objective("dino")
    theirs = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=T_TEACHER, teacher_temp=T_TEACHER,
                                   student_temp=T_STUDENT, center_momentum=CENTER_M).double()
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        views = _views(step)
        t_cls = 3 * torch.randn(G * B, K, generator=g, dtype=torch.float64)
        s_cls = 3 * torch.randn((G + L) * B, K, generator=g, dtype=torch.float64)
        student, teacher = HeadOutput(s_cls, s_cls[:, :1]), HeadOutput(t_cls, t_cls[:, :1])
        loss = ours.loss(student, teacher, views, T_TEACHER)["loss"]
        ours.update_centers(teacher)
        reference = theirs(list(t_cls.unflatten(0, (G, B))), list(s_cls.unflatten(0, (G + L, B))),
                           teacher_temp=T_TEACHER)
        torch.testing.assert_close(loss, reference, rtol=1e-10, atol=0)
        torch.testing.assert_close(ours.cls_center.center, theirs.center[0], rtol=1e-12, atol=1e-14)


def test_masked_patch_loss_and_its_center_agree_with_lightly_ibot_patch_loss():
    """Per crop the mean over its masked cells, summed and divided by all global crops (unmasked ones count as
    zeros), the patch center updated from the masked teacher cells only: lightly's ``IBOTPatchLoss``."""
    ours = _objective("ibot", mask_probability=0.5, mask_ratio=(0.1, 0.5))
    theirs = lightly_loss.IBOTPatchLoss(output_dim=K, teacher_temp=T_TEACHER, student_temp=T_STUDENT,
                                        center_momentum=CENTER_M).double()
    g = torch.Generator().manual_seed(1)
    grid = (4, 4)
    checked = 0
    for step in range(4):
        views = _views(10 + step)
        masks, keys, weight = masked_cells(views, grid, ours.options, g)
        if len(keys) == 0:
            continue
        rows = torch.arange(len(keys))
        selection = Selection(keys, keys, None, MaskedCells(masks, rows, rows, weight))
        t_patch = 3 * torch.randn(len(keys), K, generator=g, dtype=torch.float64)
        s_patch = 3 * torch.randn(len(keys), K, generator=g, dtype=torch.float64)
        cls = torch.zeros(G * B, K, dtype=torch.float64)
        student = HeadOutput(cls, cls, patch=s_patch, selection=selection)
        teacher = HeadOutput(cls, cls, patch=t_patch)
        loss = ours.masked_loss(student, teacher, T_TEACHER)
        ours.update_centers(teacher)
        with portable_init():  # float64 default dtype: lightly's 1 / (masked cells) follows it (float32 otherwise)
            reference = theirs(t_patch, s_patch, masks.view(G * B, *grid), teacher_temp=T_TEACHER)
        torch.testing.assert_close(loss, reference, rtol=1e-10, atol=0)
        torch.testing.assert_close(ours.patch_center.center, theirs.center.value, rtol=1e-12, atol=1e-14)
        checked += 1
    assert checked >= 3  # at least three steps had masked cells (and a center that moved)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_koleo_agrees_with_lightly(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    x[5] = 2 * x[3]  # one pair at distance 0 after normalisation: the log of eps, in both
    torch.testing.assert_close(koleo_loss(x), lightly_loss.KoLeoLoss()(x), rtol=1e-12, atol=0)


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_knopp_agrees_with_lightly_in_float64(iterations):
    """dinov2's teacher Sinkhorn-Knopp is SwAV's algorithm with the teacher temperature as epsilon."""
    g = torch.Generator().manual_seed(iterations)
    logits = torch.randn(9, 13, generator=g, dtype=torch.float64)
    ours = sinkhorn_knopp(logits, temp=0.1, iterations=iterations)
    torch.testing.assert_close(ours, lightly_sinkhorn(logits, iterations=iterations, epsilon=0.1),
                               rtol=1e-10, atol=1e-14)


def test_sinkhorn_knopp_deliberately_subtracts_the_maximum_where_lightly_overflows():
    """A deliberate difference: pwself subtracts the largest logit before ``exp`` (it cancels in the
    normalisation), lightly exponentiates directly, as SwAV and dinov2 do. At a teacher temperature of 0.02,
    float32 logits of 2 already overflow ``exp`` (100 > 88.7): lightly's targets become NaN, pwself's do not,
    and they equal lightly's float64 targets."""
    g = torch.Generator().manual_seed(3)
    logits = 2 + torch.rand(6, 5, generator=g)
    assert torch.isnan(lightly_sinkhorn(logits, iterations=3, epsilon=0.02)).all()
    ours = sinkhorn_knopp(logits, temp=0.02)
    assert torch.isfinite(ours).all()
    exact = lightly_sinkhorn(logits.double(), iterations=3, epsilon=0.02)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-6)
