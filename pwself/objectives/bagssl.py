"""BagSSL (Chen et al. 2022): the image representation is the bag, the mean embedding of its
patches. The teacher target of an image is its head on the mean of the CLS tokens of all teacher views;
every student view (a fixed-size patch of the image when the views are configured so) predicts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pwself.models import DistillNet, HeadOutput, Selection, TokenOutput
from pwself.objectives.base import Objective
from pwself.views import MultiCropViews

__all__ = ["BagSSL"]


class BagSSL(Objective):
    """Pairs (bag, view ``j``) for every view ``j``: ``H(bag, s_cls[j])``, averaged."""

    pooling: ClassVar[str] = "bag"  # evaluation: the mean CLS of the image's tiles at native resolution

    def pairs(self, n_global: int, n_views: int) -> list[tuple[int, int]]:
        return [(0, j) for j in range(n_views)]

    def teacher_output(self, teacher: DistillNet, tokens: Sequence[TokenOutput], views: MultiCropViews,
                       selection: Selection | None) -> HeadOutput:
        bag = tokens[0].cls.unflatten(0, (views.n_global, views.batch_size)).mean(0)  # [B, D]
        return HeadOutput(teacher.head(bag), bag)
