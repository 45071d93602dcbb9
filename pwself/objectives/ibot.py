"""Masked patch distillation (iBOT, Zhou et al. 2022; the dense part of DINOv2), and PW-Self with it
(docs/algorithm.md §5).

``ibot``: DINO's CLS loss plus ``weight`` times the masked patch loss. Half of the student's global crops
(``mask_probability``) get block-wise masks (:mod:`pwself.masking`); the patch embedding of a masked cell
is replaced by a learnable mask token; at every masked cell the student predicts the teacher's distribution
of the same cell of the same crop, seen unmasked. Per crop the cross-entropies are averaged over its masked
cells, then summed over crops and divided by the number of global crops (unmasked crops count as zeros),
as dinov2's ``iBOTPatchLoss.forward_masked``. Patch targets have their own center (or Sinkhorn-Knopp with
``loss.centering=sinkhorn``); the patch head is ``head.patch_head`` (``shared``: iBOT's shared head;
``separate``: DINOv2's).

``pwml_ibot``: PW-Self's PWML on the masked student crops (matched cells of the other views predict the
teacher's matched cell, as in PWML, whether masked or not) plus the same masked term. The two targets
are complementary: PWML's come from another view of the same place (invariance across crops), iBOT's from
the same view unmasked (prediction of hidden content); iBOT's paper combines its masked term with
cross-view CLS distillation in the same way, so the combination adds the masked term to PWML unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from pwself.losses import Center, PairRows, pair_targets, target_cross_entropy
from pwself.masking import draw_masks
from pwself.models import HeadOutput, MaskedCells, Selection, TokenOutput
from pwself.objectives.base import Objective
from pwself.objectives.patchwise import PWML
from pwself.sections import FRACTION, NON_NEGATIVE, check_interval, check_ranges
from pwself.views import MultiCropViews

if TYPE_CHECKING:
    from pwself.models import HeadConfig
    from pwself.objectives.base import LossConfig
    from pwself.views import ViewConfig

__all__ = ["IBOTOptions", "IBOT", "PWMLiBOT", "masked_cells"]


@dataclass
class IBOTOptions:
    """Masked patch distillation's knobs (dinov2's defaults).

    Attributes:
        weight: Weight of the masked patch loss beside the other terms (lambda_ibot).
        mask_probability: Fraction of the student's global crops that are masked in a step.
        mask_ratio: Range [low, high] of the masked fraction of a masked crop's cells (split in equal bins).
    """

    weight: float = 1.0
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)

    def validate(self, prefix: str) -> None:
        check_ranges(self, prefix, {"weight": NON_NEGATIVE, "mask_probability": FRACTION})
        check_interval(f"{prefix}.mask_ratio", self.mask_ratio, upper=1)


def masked_cells(views: MultiCropViews, grid: tuple[int, int], options: IBOTOptions,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(masks [G * B, T], keys [M], weight [M])``: the masks of the student's global crops, the patch key of
    every masked cell (the same key in the student's and the teacher's token layout: global crops come
    first in both) and its loss weight, 1 / (masked cells of its crop) / (G * B)."""
    n_crops, dev = views.n_global * views.batch_size, views.global_crops.device
    masks = draw_masks(n_crops, grid, options.mask_ratio, options.mask_probability, generator)
    keys = masks.flatten().nonzero().squeeze(1)
    per_crop = masks.sum(1).clamp(min=1).double()
    weight = (1.0 / per_crop / n_crops).repeat_interleave(masks.sum(1))
    return masks.to(dev), keys.to(dev), weight.to(dev)


class _MaskedTerm:
    """The masked patch loss and its center, shared by :class:`IBOT` and :class:`PWMLiBOT`."""

    patch_center: Center
    options: Any

    def masked_loss(self, student: HeadOutput, teacher: HeadOutput, teacher_temp: float) -> Tensor:
        """``sum over masked cells of weight * H(teacher cell, student cell)``."""
        assert student.patch is not None and teacher.patch is not None and student.selection is not None
        cells = student.selection.masked
        assert cells is not None
        if len(cells.student_row) == 0:  # no crop masked this step (a tiny batch)
            return student.cls.new_zeros(())
        probs = self.targets(teacher.patch, self.patch_center, teacher_temp)  # type: ignore[attr-defined]
        (target,) = pair_targets(probs, cells.student_row, cells.teacher_row, (cells.weight,), student.patch.shape[0])
        return target_cross_entropy(student.patch, target, self.student_temp)[0]  # type: ignore[attr-defined]

    def loss(self, student: HeadOutput, teacher: HeadOutput, views: MultiCropViews, teacher_temp: float
             ) -> dict[str, Tensor]:
        """The next class's loss (DINO's, PWML's) plus ``weight`` x the masked term."""
        terms = super().loss(student, teacher, views, teacher_temp)  # type: ignore[misc]
        masked = self.masked_loss(student, teacher, teacher_temp)
        return {**terms, "loss": terms["loss"] + self.options.weight * masked, "ibot": masked.detach()}


class IBOT(_MaskedTerm, Objective):
    """DINO's CLS loss on every (teacher global, student view) pair + ``weight`` x the masked patch loss."""

    uses_mask_token: ClassVar[bool] = True
    Options = IBOTOptions

    def __init__(self, loss: LossConfig, out_dim: int, embed_dim: int, patch_out_dim: int | None = None,
                 options: IBOTOptions | None = None) -> None:
        super().__init__(loss, out_dim, embed_dim, patch_out_dim, options)
        self.patch_center = Center(self.patch_out_dim, loss.center_momentum)

    def select(self, views: MultiCropViews, grids: Sequence[tuple[int, int]], teacher_tokens: Sequence[TokenOutput],
               generator: torch.Generator | None) -> Selection:
        masks, keys, weight = masked_cells(views, grids[0], self.options, generator)
        rows = torch.arange(len(keys), device=keys.device)
        return Selection(keys, keys, None, MaskedCells(masks, rows, rows, weight))

    @torch.no_grad()
    def update_centers(self, teacher: HeadOutput) -> None:
        super().update_centers(teacher)
        if teacher.patch is not None:
            self.patch_center.update(teacher.patch)


def _merge(pairs: Selection, keys: Tensor, masks: Tensor, weight: Tensor) -> Selection:
    """One selection holding PWML's matched pairs and the masked cells: every token goes through the head once."""
    assert pairs.rows is not None and pairs.teacher_keys is not None
    s_keys, s_inv = torch.unique(torch.cat([pairs.student_keys, keys]), return_inverse=True)
    t_keys, t_inv = torch.unique(torch.cat([pairs.teacher_keys, keys]), return_inverse=True)
    n_s, n_t, r = len(pairs.student_keys), len(pairs.teacher_keys), pairs.rows
    rows = PairRows(s_inv[:n_s][r.student_row], t_inv[:n_t][r.teacher_row], r.pair_index, r.count, r.weight)
    return Selection(s_keys, t_keys, rows, MaskedCells(masks, s_inv[n_s:], t_inv[n_t:], weight))


class PWMLiBOT(_MaskedTerm, PWML):
    """PWML on the masked student crops + ``weight`` x the masked patch loss (one patch center for both)."""

    uses_mask_token: ClassVar[bool] = True
    Options = IBOTOptions

    def __init__(self, loss: LossConfig, out_dim: int, embed_dim: int, patch_out_dim: int | None = None,
                 options: IBOTOptions | None = None) -> None:
        super().__init__(loss, out_dim, embed_dim, patch_out_dim, options)
        self.recompute_head = False  # the masked term reads the student's patch logits

    @classmethod
    def config_problem(cls, views: ViewConfig, head: HeadConfig, loss: LossConfig) -> str | None:
        if loss.matcher != "geometric":
            return f"loss.matcher={loss.matcher}: the masks are drawn before the forward, use loss.matcher=geometric"
        return super().config_problem(views, head, loss)

    def select(self, views: MultiCropViews, grids: Sequence[tuple[int, int]], teacher_tokens: Sequence[TokenOutput],
               generator: torch.Generator | None) -> Selection | Callable[[Sequence[TokenOutput]], Selection]:
        pairs = super().select(views, grids, teacher_tokens, generator)
        assert isinstance(pairs, Selection), "geometric matching selects before the forward"
        masks, keys, weight = masked_cells(views, grids[0], self.options, generator)
        return _merge(pairs, keys, masks, weight)
