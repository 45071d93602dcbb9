"""CO-SSL (Aubret et al. 2025): local, pre-pooling representations aligned with the global one.

CO-DINO on a ViT: DINO's image-level loss plus ``w_s`` (``objectives.cossl.weight``) times the local loss, where
every student patch token of view ``j`` (a local representation) predicts the teacher's CLS of the other
view ``i``: no matching. The targets are CLS outputs, centred with the CLS center. The paper gives the
local representations a head of their own (``head.patch_head=separate``; one shared head is its ablation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from pwself.losses import PatchInputs
from pwself.models import HeadOutput, TokenOutput
from pwself.objectives.base import Objective, Selection, patch_key_layout, select_pairs
from pwself.sections import NON_NEGATIVE, check_ranges
from pwself.views import MultiCropViews

if TYPE_CHECKING:
    from pwself.objectives.base import LossConfig

__all__ = ["COSSL", "COSSLOptions"]


@dataclass
class COSSLOptions:
    """CO-SSL's own knobs (``objectives.cossl.*``).

    Attributes:
        weight: Weight ``w_s`` of the local loss (the mean over a view's patch tokens) beside the image-level loss.
    """

    weight: float = 1.0

    def validate(self, prefix: str) -> None:
        check_ranges(self, prefix, {"weight": NON_NEGATIVE})


class COSSL(Objective):
    """Per pair ``(i, j)``: ``H(t_i, s_j) + w_s * mean over the tokens t of j of H(t_i, s_{j,t})``."""

    patch_targets_are_cls: ClassVar[bool] = True
    Options = COSSLOptions

    def __init__(self, loss: LossConfig, out_dim: int, embed_dim: int, patch_out_dim: int | None = None,
                 options: COSSLOptions | None = None) -> None:
        super().__init__(loss, out_dim, embed_dim, patch_out_dim, options)
        self.patch_fraction, self.recompute_head = loss.patch_fraction, loss.recompute_head
        self.local_weight = self.options.weight

    def select(
        self, views: MultiCropViews, grids: Sequence[tuple[int, int]], teacher_tokens: Sequence[TokenOutput],
        generator: torch.Generator | None,
    ) -> Selection:
        b, dev = views.batch_size, views.global_crops.device
        pairs = self.pairs(views.n_global, views.n_global + views.n_local)
        tokens_per_view, view_offset = patch_key_layout(grids, b, dev)
        s_key, t_key, pair_idx = [], [], []
        for p, (i, j) in enumerate(pairs):  # teacher keys are rows of the teacher CLS outputs
            n_tok = int(tokens_per_view[j])
            sample = torch.arange(b, device=dev).repeat_interleave(n_tok)
            s_key.append(view_offset[j] + torch.arange(b * n_tok, device=dev))
            t_key.append(i * b + sample)
            pair_idx.append(p * b + sample)
        return select_pairs(torch.cat(s_key), torch.cat(t_key), torch.cat(pair_idx), len(pairs) * b,
                            self.patch_fraction, generator, teacher_unique=False)

    def term_weights(self, n_patch: Tensor) -> tuple[Tensor, Tensor]:
        n = n_patch.float()
        return torch.ones_like(n), self.local_weight / n.clamp(min=1)

    def patch_inputs(self, student: HeadOutput, teacher: HeadOutput, teacher_temp: float) -> PatchInputs:
        assert student.patch is not None
        return PatchInputs(student.patch, self.targets(teacher.cls, self.cls_center, teacher_temp),
                           student.selection.rows, student.head)
