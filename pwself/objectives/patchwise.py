"""PW-Self (Javidani et al. 2023, arXiv 2310.18651): the CLS pair plus every geometrically matched patch pair
of two views (docs/algorithm.md §3–4).

Per (view pair, sample), with ``H_cls`` the CLS cross-entropy, ``S`` the sum over the ``n`` matched patch
pairs: PWML ``(H_cls + S) / (1 + n)`` (the paper's default), PWSL ``H_cls + S``, PWLL
``lam * H_cls + (1 - lam) * S / n`` (``H_cls`` alone when ``n == 0``). Patch targets have their own center.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from pwself.losses import Center, PatchInputs
from pwself.matching import match_views, match_views_by_features
from pwself.models import HeadOutput, TokenOutput
from pwself.objectives.base import Objective, Selection, matched_keys, select_pairs
from pwself.views import MultiCropViews

if TYPE_CHECKING:
    from pwself.objectives.base import LossConfig

__all__ = ["PatchWise", "PWML", "PWSL", "PWLL"]


class PatchWise(Objective):
    """The shared machinery of the three PW-Self losses: matching, token selection, patch center."""

    def __init__(self, loss: LossConfig, out_dim: int, embed_dim: int, patch_out_dim: int | None = None,
                 options: Any = None) -> None:
        super().__init__(loss, out_dim, embed_dim, patch_out_dim, options)
        self.patch_center = Center(self.patch_out_dim, loss.center_momentum)
        self.matcher, self.patch_fraction, self.lam = loss.matcher, loss.patch_fraction, loss.lam
        self.recompute_head = loss.recompute_head

    def select(
        self, views: MultiCropViews, grids: Sequence[tuple[int, int]], teacher_tokens: Sequence[TokenOutput],
        generator: torch.Generator | None,
    ) -> Selection | Callable[[Sequence[TokenOutput]], Selection]:
        pairs = self.pairs(views.n_global, views.n_global + views.n_local)
        n_pb = len(pairs) * views.batch_size

        def from_matches(matched):  # noqa: ANN001, ANN202
            s_key, t_key = matched_keys(matched, pairs, grids)
            return select_pairs(s_key, t_key, matched.pair_index, n_pb, self.patch_fraction, generator)

        if self.matcher == "geometric":  # boxes and flips only: known before the forward
            return from_matches(match_views(views.boxes, views.flips, grids, pairs).to(views.global_crops.device))
        if self.matcher != "feature-nn":
            raise ValueError(f"matcher {self.matcher!r}: use geometric or feature-nn")
        b = views.batch_size
        t_views = list(teacher_tokens[0].patches.unflatten(0, (views.n_global, b)))

        def by_features(student_tokens: Sequence[TokenOutput]) -> Selection:  # content decides (EsViT style)
            s_views = [v for t in student_tokens for v in t.patches.unflatten(0, (-1, b))]
            return from_matches(match_views_by_features(t_views, s_views, pairs))

        return by_features

    def patch_inputs(self, student: HeadOutput, teacher: HeadOutput, teacher_temp: float) -> PatchInputs:
        assert student.patch is not None and teacher.patch is not None
        return PatchInputs(student.patch, self.targets(teacher.patch, self.patch_center, teacher_temp),
                           student.selection.rows, student.head)

    @torch.no_grad()
    def update_centers(self, teacher: HeadOutput) -> None:
        super().update_centers(teacher)
        if teacher.patch is not None:
            self.patch_center.update(teacher.patch)


class PWML(PatchWise):
    """The mean over the CLS pair and the matched patch pairs."""

    def term_weights(self, n_patch: Tensor) -> tuple[Tensor, Tensor]:
        w = 1 / (1 + n_patch.float())
        return w, w


class PWSL(PatchWise):
    """The sum over the CLS pair and the matched patch pairs."""

    def term_weights(self, n_patch: Tensor) -> tuple[Tensor, Tensor]:
        one = torch.ones_like(n_patch.float())
        return one, one


class PWLL(PatchWise):
    """``lam`` on the CLS term, ``1 - lam`` on the mean patch term (the CLS term alone without a match)."""

    def term_weights(self, n_patch: Tensor) -> tuple[Tensor, Tensor]:
        n = n_patch.float()
        has = n_patch > 0
        return torch.where(has, self.lam, torch.ones_like(n)), torch.where(has, (1 - self.lam) / n.clamp(min=1),
                                                                         torch.zeros_like(n))
