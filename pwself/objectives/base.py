"""The objective protocol, and the token bookkeeping the patch objectives share.

An objective says which patch tokens a step needs (:meth:`Objective.select`, before the forward when the
matches depend on geometry only), what the teacher outputs (:meth:`Objective.teacher_output`), its loss on
the head outputs (:meth:`Objective.loss`), how its centers move, how its features are pooled for
evaluation (:attr:`Objective.pooling`) and which trainable modules it owns besides the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from pwself.losses import (
    Center,
    PairRows,
    PatchInputs,
    distillation_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_probs,
    view_pairs,
)
from pwself.matching import MATCHERS, PatchPairs
from pwself.models import DistillNet, HeadConfig, HeadOutput, Selection, TokenOutput
from pwself.sections import FRACTION, NON_NEGATIVE, POSITIVE, check_choice, check_ranges
from pwself.views import MultiCropViews, ViewConfig

__all__ = ["Objective", "Selection", "view_grids", "patch_key_layout", "select_pairs"]


CENTERINGS = ("center", "sinkhorn")  # loss.centering: EMA center (DINO) or Sinkhorn-Knopp (DINOv2)


@dataclass
class LossConfig:
    """Objective and temperatures (docs/algorithm.md §4).

    Attributes:
        objective: The objective, a name registered in `pwself.objectives` (PW-Self's PWML by default).
        lam: CLS weight of ``pwll``.
        student_temp: Student temperature.
        teacher_temp: Teacher temperature after warm-up.
        warmup_teacher_temp: Teacher temperature at the start.
        warmup_teacher_temp_epochs: Linear warm-up length of the teacher temperature.
        center_momentum: EMA momentum of the CLS and patch centers.
        matcher: ``geometric`` (docs/algorithm.md §3) or ``feature-nn`` (each student patch to its most similar
            teacher patch, EsViT style; to measure what geometry buys).
        patch_fraction: Fraction of the patch pairs (matched pairs; for ``cossl`` the student patch
            tokens) that enter the loss each step, drawn at random per pair. Their sum is divided by
            the fraction and the counts stay exact, so the loss is an unbiased estimate of the full
            one while the head runs on about that fraction of the patch tokens. 1.0 (default) is the
            paper's objective; lower trades gradient noise for step time (see benchmarks).
        recompute_head: Recompute the student head and the patch cross-entropies in backward
            (activation checkpointing) instead of keeping their activations: the same loss and
            gradients with about DINO's activation memory, for a little more time per step. Worth it
            with a large ``head.out_dim`` on a GPU, where ``[tokens, out_dim]`` logits fill memory.
        koleo_weight: Weight of the KoLeo regularizer on the student's backbone CLS features of each global view
            across the batch (dinov2: 0.1; 0: off).
        centering: Teacher targets centred by an EMA ``center`` (DINO) or made by ``sinkhorn`` (Sinkhorn-Knopp,
            as DINOv2/v3; the EMA centers are then unused).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (dinov2: 3).
        gram_weight: Weight of Gram anchoring (DINOv3; 0: off): the MSE between the Gram matrices of the student's
            L2-normalised patch tokens of each global crop and those of a frozen anchor, the starting model of
            ``backbone.init``, on the same crop; keeps the patch similarities of a released backbone while it is
            post-trained (``docs/algorithm.md``, "Gram anchoring"). Needs ``backbone.init``.
    """

    objective: str = "pwml"  # pwself.objectives.DEFAULT_OBJECTIVE
    lam: float = 0.5
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    matcher: str = "geometric"
    patch_fraction: float = 1.0
    recompute_head: bool = False
    koleo_weight: float = 0.0
    centering: str = "center"
    sinkhorn_iterations: int = 3
    gram_weight: float = 0.0

    def validate(self) -> None:
        """Raise :class:`~pwself.sections.ConfigError` for a value out of range or an unknown matcher (the
        objective's name is checked against the registry by :func:`pwself.objectives.check_objective`)."""
        check_ranges(self, "loss", {**{k: POSITIVE for k in ("teacher_temp", "warmup_teacher_temp", "student_temp")},
                                    "warmup_teacher_temp_epochs": NON_NEGATIVE, "center_momentum": FRACTION,
                                    "lam": (lambda x: 0 <= x <= 1, "in [0, 1]: it is the CLS weight of the loss"),
                                    "patch_fraction": (lambda x: 0 < x <= 1, "in (0, 1]"),
                                    "koleo_weight": NON_NEGATIVE, "sinkhorn_iterations": POSITIVE,
                                    "gram_weight": NON_NEGATIVE})
        check_choice("loss.matcher", self.matcher, MATCHERS)
        check_choice("loss.centering", self.centering, CENTERINGS)


def view_grids(views: MultiCropViews, patch_size: int) -> list[tuple[int, int]]:
    """Patch grid ``(rows, cols)`` of every view, globals first."""
    g, loc = views.global_crops.shape[-2:], views.local_crops.shape[-2:]
    return ([(g[0] // patch_size, g[1] // patch_size)] * views.n_global
            + [(loc[0] // patch_size, loc[1] // patch_size)] * views.n_local)


def patch_key_layout(grids: Sequence[tuple[int, int]], batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(tokens_per_view [V], view_offset [V])``: a student patch key is ``view_offset[j] + b * T_j + t``."""
    tokens_per_view = torch.tensor([r * c for r, c in grids], device=device)
    return tokens_per_view, torch.cumsum(tokens_per_view * batch, 0) - tokens_per_view * batch


def select_pairs(
    student_key: Tensor, teacher_key: Tensor, pair_index: Tensor, n_pb: int, fraction: float,
    generator: torch.Generator | None, teacher_unique: bool = True,
) -> Selection:
    """The :class:`Selection` of pairs given by their flat keys, optionally a random ``fraction`` of them.

    With ``fraction < 1`` each pair is kept with that probability (drawn from the CPU ``generator``) and
    reweighted by ``1 / fraction``, while the counts stay those of all pairs: an unbiased, cheaper loss. A
    token used by several pairs (a local view seen by both teachers) goes through the head once: keys
    are made unique and pairs point at rows. ``teacher_unique=False`` keeps the teacher keys as rows (the
    targets are then rows of an existing output, e.g. the teacher CLS).
    """
    count, weight = torch.bincount(pair_index, minlength=n_pb), 1.0
    if fraction < 1.0:
        keep = (torch.rand(len(pair_index), generator=generator) < fraction).to(pair_index.device)
        student_key, teacher_key, pair_index = student_key[keep], teacher_key[keep], pair_index[keep]
        weight = 1.0 / fraction
    s_unique, s_row = torch.unique(student_key, return_inverse=True)
    t_unique, t_row = torch.unique(teacher_key, return_inverse=True) if teacher_unique else (None, teacher_key)
    return Selection(s_unique, t_unique, PairRows(s_row, t_row, pair_index, count, weight))


def matched_keys(matched: PatchPairs, pairs: Sequence[tuple[int, int]], grids: Sequence[tuple[int, int]]
                 ) -> tuple[Tensor, Tensor]:
    """Flat student and teacher patch keys of every match (teacher keys index the global views' tokens)."""
    dev, b = matched.pair_index.device, matched.batch
    tokens_per_view, view_offset = patch_key_layout(grids, b, dev)
    pair_of = matched.pair_index // b
    view_t = torch.tensor([i for i, _ in pairs], device=dev)[pair_of]
    view_s = torch.tensor([j for _, j in pairs], device=dev)[pair_of]
    sample = matched.sample
    s_key = view_offset[view_s] + sample * tokens_per_view[view_s] + matched.student_token
    t_key = (view_t * b + sample) * tokens_per_view[0] + matched.teacher_token
    return s_key, t_key


class Objective(nn.Module):
    """DINO's CLS self-distillation; subclasses add patch terms, other targets or modules of their own.

    Args:
        loss: The ``loss`` section of the run config.
        out_dim: Head output dimension ``K``.
        embed_dim: Backbone token width (for modules an objective owns).
        patch_out_dim: Output dimension of the patch head (default: ``out_dim``, the shared head).
    """

    pooling: ClassVar[str] = "cls"
    """Feature pooling of a trained backbone for evaluation (see :func:`pwself.eval.features.pool_features`)."""
    patch_targets_are_cls: ClassVar[bool] = False
    """Patch outputs are compared with CLS outputs: the patch head must have the CLS head's width."""
    uses_mask_token: ClassVar[bool] = False
    """The student's global crops are masked: the network gets a learnable mask token."""
    Options: ClassVar[type | None] = None
    """A dataclass of this objective's own knobs, set as ``objectives.NAME.KNOB=VALUE`` and passed to
    ``__init__`` as ``options``: one-line meanings in its docstring's ``Attributes:``, ranges in its
    ``validate(prefix)``. ``None``: no knobs of its own."""

    def __init__(self, loss: LossConfig, out_dim: int, embed_dim: int, patch_out_dim: int | None = None,
                 options: Any = None) -> None:
        super().__init__()
        self.options = options if options is not None or self.Options is None else self.Options()
        self.patch_out_dim = patch_out_dim or out_dim
        self.student_temp = loss.student_temp
        self.recompute_head = False
        self.cls_center = Center(out_dim, loss.center_momentum)
        self.koleo_weight, self.centering, self.sinkhorn_iterations = (loss.koleo_weight, loss.centering,
                                                                       loss.sinkhorn_iterations)

    @classmethod
    def config_problem(cls, views: ViewConfig, head: HeadConfig, loss: LossConfig) -> str | None:
        """Why these views, head and loss settings cannot train this objective, or ``None``."""
        if cls.patch_targets_are_cls and head.patch_out_dim not in (0, head.out_dim):
            return (f"head.patch_out_dim={head.patch_out_dim}: its patch outputs are compared with CLS outputs of "
                    f"head.out_dim={head.out_dim}, use head.patch_out_dim=0")
        return None

    def pairs(self, n_global: int, n_views: int) -> list[tuple[int, int]]:
        """The (teacher view, student view) pairs of the loss."""
        return view_pairs(n_global, n_views)

    def select(
        self, views: MultiCropViews, grids: Sequence[tuple[int, int]], teacher_tokens: Sequence[TokenOutput],
        generator: torch.Generator | None,
    ) -> Selection | Callable[[Sequence[TokenOutput]], Selection] | None:
        """The patch tokens the loss needs (``None``: CLS only), or a function of the student tokens that
        gives them when the choice depends on content."""
        return None

    def teacher_output(self, teacher: DistillNet, tokens: Sequence[TokenOutput], views: MultiCropViews,
                       selection: Selection | None) -> HeadOutput:
        """The teacher head on its CLS tokens and the selected teacher patch tokens."""
        return teacher.project(tokens, selection.teacher_keys if selection is not None else None)

    def targets(self, logits: Tensor, center: Center, teacher_temp: float) -> Tensor:
        """Teacher distributions of ``[N, K]`` logits: centred by ``center`` and sharpened, or Sinkhorn-Knopp
        (``loss.centering``), over all ``N`` rows at once."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(logits, teacher_temp, self.sinkhorn_iterations)
        return teacher_probs(logits, center, teacher_temp)

    def term_weights(self, n_patch: Tensor) -> tuple[Tensor, Tensor]:
        """Weights ``(a, c)`` of ``H_cls`` and the patch sum ``S`` per (pair, sample) from ``[P, B]`` counts."""
        n = n_patch.float()
        return torch.ones_like(n), torch.zeros_like(n)

    def patch_inputs(self, student: HeadOutput, teacher: HeadOutput, teacher_temp: float) -> PatchInputs | None:
        """The patch half of the loss (``None`` for CLS-only objectives)."""
        return None

    def loss(self, student: HeadOutput, teacher: HeadOutput, views: MultiCropViews, teacher_temp: float
             ) -> dict[str, Tensor]:
        """Loss and reported terms; ``terms["loss"]`` carries the graph."""
        b, n_views = views.batch_size, views.n_global + views.n_local
        t_probs = self.targets(teacher.cls, self.cls_center, teacher_temp).unflatten(0, (-1, b))
        pairs = self.pairs(views.n_global, n_views)
        terms = distillation_loss(student.cls.unflatten(0, (n_views, b)), t_probs, pairs, self.student_temp,
                                  self.term_weights, self.patch_inputs(student, teacher, teacher_temp))
        if self.koleo_weight > 0:  # dinov2: summed over the global crop indices, each across the batch
            per_view = student.cls_tokens[: views.n_global * b].unflatten(0, (views.n_global, b))
            koleo = sum(koleo_loss(x) for x in per_view)
            terms = {**terms, "loss": terms["loss"] + self.koleo_weight * koleo, "koleo": koleo.detach()}
        return terms

    @torch.no_grad()
    def update_centers(self, teacher: HeadOutput) -> None:
        """EMA-update the centers from the teacher outputs that entered the loss (each token once)."""
        self.cls_center.update(teacher.cls)

    def wrap_trainable(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Run the trainable modules this objective owns through ``wrap`` (``DistributedDataParallel``)."""
