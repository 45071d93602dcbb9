"""Building blocks of the self-distillation losses (docs/algorithm.md §4), shared by every objective in
:mod:`pwself.objectives`.

Pairs are (teacher view ``i``, student view ``j``) with ``j != i``. For pair ``p`` and sample ``b``:

* ``H_cls[p, b] = H(t_cls[i, b], s_cls[j, b])``
* ``S[p, b]`` = the sum of ``H`` over the matched patch pairs, ``n[p, b]`` their count,

with ``H(t, s) = -sum softmax((t - C) / tau_t) * log_softmax(s / tau_s)``. An objective is
``a * H_cls + c * S`` per (pair, sample) with weights ``(a, c)`` that depend on ``n`` only (its
``term_weights``), averaged over pairs and samples: :func:`distillation_loss` computes exactly that.
Centers are EMA buffers updated by an explicit call, never as a side effect of the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Center",
    "soft_cross_entropy",
    "teacher_probs",
    "pair_targets",
    "target_cross_entropy",
    "PairRows",
    "PatchInputs",
    "TermWeights",
    "distillation_loss",
    "view_pairs",
    "at_least_fp32",
    "sinkhorn_knopp",
    "koleo_loss",
    "gram_loss",
]

TermWeights = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``[P, B]`` match counts -> ``[P, B]`` float weights of ``H_cls`` and of the patch sum ``S``."""


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 when it is float64: half-precision sums are too coarse, and a float64 run
    (``precision=fp64``, the portable golden runs) must not drop to float32 kernels, whose rounding differs
    between CPUs."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def view_pairs(n_global: int, n_views: int) -> list[tuple[int, int]]:
    """(teacher global, student view) pairs, a view never teaching itself: ``G * V - G`` pairs."""
    return [(i, j) for i in range(n_global) for j in range(n_views) if j != i]


class Center(nn.Module):
    """EMA center of teacher logits, ``C <- m * C + (1 - m) * mean(x)``, all-reduced under DDP.

    Args:
        dim: Logit dimension ``K``.
        momentum: EMA momentum ``m``.
    """

    center: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, logits: Tensor) -> None:
        """Update from ``[N, K]`` teacher logits (every row counts once); no-op when ``N == 0``."""
        wide = at_least_fp32(logits)
        stats = torch.cat([wide.sum(0), wide.new_tensor([logits.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        count = stats[-1]
        if count == 0:
            return
        mean = stats[:-1] / count
        self.center.mul_(self.momentum).add_(mean[None], alpha=1 - self.momentum)


def soft_cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """``-sum_k t_k log softmax(s / tau_s)_k`` over the last axis, computed in float32 (at least)."""
    log_p = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)
    return -(at_least_fp32(teacher_probs) * log_p).sum(-1)


def pair_targets(
    teacher_probs: Tensor, student_rows: Tensor, teacher_rows: Tensor, weights: Sequence[Tensor], n_student: int
) -> list[Tensor]:
    """Weighted teacher distributions summed per student row: ``Q[u] = sum_{n: s_n = u} w[n] * t[t_n]``.

    Every pair ``n`` contributes ``w[n] * H(t[t_n], s[s_n])`` to a sum that is linear in the student's
    log-probabilities, so ``sum_n w[n] * H_n = -sum_u <Q[u], log_softmax(s[u])>``: one ``[U, K]`` product
    instead of ``[N, K]`` gathered copies. One ``embedding_bag`` (a bag per student row) per weight vector,
    the bags laid out once, without gradient.

    Args:
        teacher_probs: ``[Ut, K]`` teacher distributions.
        student_rows: ``[N]`` long student row of each pair.
        teacher_rows: ``[N]`` long teacher row of each pair.
        weights: ``[N]`` weight vectors, one target wanted for each.
        n_student: Number ``U`` of student rows.

    Returns:
        One ``[U, K]`` float32 target per weight vector (separate tensors, so each can be freed alone).
    """
    order = torch.argsort(student_rows, stable=True)  # a bag is a contiguous run of the input
    counts = torch.bincount(student_rows, minlength=n_student)
    offsets, rows = torch.cumsum(counts, 0) - counts, teacher_rows[order]
    with torch.no_grad(), torch.autocast(teacher_probs.device.type, enabled=False):
        table = at_least_fp32(teacher_probs)
        return [F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=w[order].to(table.dtype))
                for w in weights]


class _TargetCrossEntropy(torch.autograd.Function):
    """``-sum_u <Q_u, log_softmax(z_u / tau)>`` with a hand-written backward,
    ``dz = g (softmax(z / tau) * sum_k Q - Q) / tau``: it keeps the logits and ``Q`` where autograd through
    log_softmax keeps more ``[U, K]`` buffers, and those dominate a PW-Self step on the CPU. The same sum
    for further targets is reported without gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, temp: float, *reported: Tensor) -> tuple[Tensor, ...]:  # noqa: ANN001
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(logits.device.type, enabled=False):  # a bf16 sum of thousands of terms is too coarse
            z = logits.to(dtype) / temp
            lse = torch.logsumexp(z, -1)
            sums = [t.to(dtype).sum(-1) @ lse - t.to(dtype).flatten() @ z.flatten() for t in (target, *reported)]
        ctx.save_for_backward(logits, target, lse)
        ctx.temp = temp
        ctx.mark_non_differentiable(*sums[1:])
        return tuple(sums)

    @staticmethod
    def backward(ctx, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        logits, target, lse = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):
            target = target.to(lse.dtype)
            g = logits.to(lse.dtype) / ctx.temp
            g.sub_(lse[:, None]).exp_().mul_(target.sum(-1, keepdim=True)).sub_(target)
            g.mul_(grad.to(lse.dtype) / ctx.temp)
        return (g.to(logits.dtype), None, None) + (None,) * (len(ctx.needs_input_grad) - 3)


def target_cross_entropy(logits: Tensor, target: Tensor, temp: float, *reported: Tensor) -> tuple[Tensor, ...]:
    """``-sum_u <target[u], log_softmax(logits[u] / temp)>`` in float32 (at least), differentiable in ``logits``.

    Args:
        logits: ``[U, K]`` student logits.
        target: ``[U, K]`` summed teacher distributions (:func:`pair_targets`).
        temp: Student temperature.
        *reported: More ``[U, K]`` targets whose sums are returned too, without gradient (a metric).

    Returns:
        ``(loss, *reported_sums)``, scalars.
    """
    return _TargetCrossEntropy.apply(logits, target, temp, *reported)


def teacher_probs(logits: Tensor, center: Center, temp: float) -> Tensor:
    """Centered and sharpened teacher distribution ``softmax((t - C) / tau_t)``, float32 (at least), no gradient."""
    return F.softmax((at_least_fp32(logits.detach()) - center.center) / temp, dim=-1)


def _all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """``x`` reduced over every process in place (sum or max); ``x`` itself without DDP."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV; dinov2's ``sinkhorn_knopp_teacher``), instead of an EMA center.

    ``Q = exp(z / tau)^T``, divided by its total; then ``iterations`` times each prototype row is scaled to
    sum ``1/K`` and each sample column to ``1/N``; returned times ``N`` so that each row of the ``[N, K]``
    result is a distribution. Under DDP, ``N``, the sums and the maximum run over every process's rows. The
    maximum is subtracted first: it cancels in the normalization (dinov2 exponentiates directly).

    Example:
        >>> import torch, pwself
        >>> q = pwself.sinkhorn_knopp(torch.randn(8, 5), temp=0.1)
        >>> torch.allclose(q.sum(1), torch.ones(8)), q.shape
        (True, torch.Size([8, 5]))
    """
    z = at_least_fp32(logits.detach()) / temp
    n = _all_reduce(z.new_tensor([float(z.shape[0])]))
    top = _all_reduce(z.max().reshape(1) if z.numel() else z.new_full((1,), -torch.inf), "max")
    q = torch.exp(z - top).T  # [K, N]
    q /= _all_reduce(q.sum().reshape(1))
    k = q.shape[0]
    for _ in range(iterations):
        q /= _all_reduce(q.sum(1, keepdim=True)) * k
        q /= q.sum(0, keepdim=True) * n
    return (q * n).T


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo regularizer (Sablayrolles et al. 2019; dinov2's ``KoLeoLoss``) of ``[B, D]`` features: L2-normalize,
    find each row's nearest other row by inner product, ``-mean log(||x_i - x_nn(i)|| + eps)``. Spreads
    the features of a batch apart; float32 (at least), outside autocast.

    Example:
        >>> import torch, pwself
        >>> x = torch.randn(16, 8)
        >>> bool(pwself.koleo_loss(x) < pwself.koleo_loss(x + 10))  # squeezed together: a larger loss
        True
    """
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(at_least_fp32(x), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(-1.0)
            nearest = dots.argmax(1)
        return -torch.log(F.pairwise_distance(x, x[nearest], p=2, eps=eps) + eps).mean()


def gram_loss(student: Tensor, anchor: Tensor) -> Tensor:
    """Gram anchoring (DINOv3, Siméoni et al. 2025, eq. 2; its ``GramLoss`` with ``apply_norm``, image level, no
    removal of negatives): the mean squared difference between the Gram matrices ``X Xᵀ`` of each image's
    L2-normalised ``[N, T, D]`` student patch tokens and those of the anchor (no gradient to the anchor). Keeps
    which patches look alike, not the features themselves; float32 (at least), outside autocast.

    Example:
        >>> import torch, pwself
        >>> x = torch.randn(2, 9, 16)
        >>> float(pwself.gram_loss(x, 3 * x)) < 1e-12  # the same directions: the same Gram matrices
        True
        >>> bool(pwself.gram_loss(x, torch.randn(2, 9, 16)) > 0)
        True
    """
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(at_least_fp32(student), dim=-1)
        a = F.normalize(at_least_fp32(anchor.detach()).to(s.dtype), dim=-1)
        return F.mse_loss(s @ s.transpose(-1, -2), a @ a.transpose(-1, -2))


@dataclass(frozen=True)
class PairRows:
    """Matched patch pairs as rows of the tensors the loss reads.

    Attributes:
        student_row: ``[N]`` long row of the student patch outputs of each pair.
        teacher_row: ``[N]`` long row of the teacher target distributions of each pair.
        pair_index: ``[N]`` long ``p * B + b`` of each pair.
        count: ``[P * B]`` long matches of every (view pair, sample): all of them, also when the ``N`` rows
            are a random subset.
        weight: Factor on every patch cross-entropy: ``1 / fraction`` for a subset drawn with probability
            ``fraction``, which keeps the patch sums unbiased.
    """

    student_row: Tensor
    teacher_row: Tensor
    pair_index: Tensor
    count: Tensor
    weight: float = 1.0


@dataclass(frozen=True)
class PatchInputs:
    """The patch half of a loss: student outputs, teacher targets and how they pair.

    Attributes:
        student: ``[Us, K]`` student logits of the distinct patch tokens in the loss, or their ``[Us, D]``
            tokens when ``head`` is given.
        teacher_probs: ``[Ut, K]`` teacher target distributions.
        rows: The pairs, as rows of ``student`` and ``teacher_probs``.
        head: When given, the head runs on ``student`` inside the loss under activation checkpointing:
            the ``[Us, K]`` logits are recomputed in backward instead of kept (same loss and gradients).
    """

    student: Tensor
    teacher_probs: Tensor
    rows: PairRows
    head: Callable[[Tensor], Tensor] | None = None


def _patch_term(patch: PatchInputs, n_patch: Tensor, patch_w: Tensor, student_temp: float) -> tuple[Tensor, Tensor]:
    """``sum_n w_n H_n`` over the matched pairs and the reported mean patch cross-entropy.

    The loss is linear in every patch cross-entropy, with weights known from the counts: the teacher
    targets of all pairs sharing a student token are summed first (:func:`pair_targets`), so the graph holds
    one ``[Us, K]`` product, not ``[N, K]`` gathered copies. The reported metric, the mean over (pair,
    sample) with a match of (sum of patch H) / count, is another such sum.
    """
    rows, n_pb = patch.rows, n_patch.shape[0]
    has = n_patch > 0
    w_loss = patch_w.flatten()[rows.pair_index] * (rows.weight / n_pb)
    w_report = rows.weight / (has.sum() * n_patch[rows.pair_index]).float()
    target, report = pair_targets(patch.teacher_probs, rows.student_row, rows.teacher_row, (w_loss, w_report),
                                  patch.student.shape[0])
    if patch.head is None:
        return target_cross_entropy(patch.student, target, student_temp, report)
    head = patch.head
    return checkpoint(lambda tokens: target_cross_entropy(head(tokens), target, student_temp, report),
                      patch.student, use_reentrant=False)


def distillation_loss(
    student_cls: Tensor,
    teacher_cls_probs: Tensor,
    pairs: Sequence[tuple[int, int]],
    student_temp: float,
    weights: TermWeights,
    patch: PatchInputs | None = None,
) -> dict[str, Tensor]:
    """The loss ``mean over (p, b) of a * H_cls + c * S`` and its reported terms.

    Args:
        student_cls: ``[V, B, K]`` student CLS logits of every view.
        teacher_cls_probs: ``[G, B, K]`` teacher CLS distributions (:func:`teacher_probs`).
        pairs: The ``P`` (teacher view, student view) pairs, e.g. :func:`view_pairs`.
        student_temp: Student temperature ``tau_s``.
        weights: The objective's term weights ``(a, c)`` from the match counts.
        patch: The matched patch pairs (``None`` for CLS-only objectives).

    Returns:
        ``loss`` (scalar to minimize), ``cls`` (mean CLS cross-entropy), ``patch`` (mean over pairs and
        samples with a match of the mean patch cross-entropy) and ``n_match`` (mean matched patch pairs
        per pair and sample).

    Example:
        DINO's CLS loss of 4 views (2 global) of 3 images with 16 prototypes:

        >>> import torch, pwself
        >>> from pwself.losses import Center, teacher_probs, view_pairs
        >>> t = teacher_probs(torch.randn(2, 3, 16), Center(16), 0.04)
        >>> dino = lambda n: (torch.ones_like(n, dtype=torch.float), torch.zeros_like(n, dtype=torch.float))
        >>> terms = pwself.distillation_loss(torch.randn(4, 3, 16), t, view_pairs(2, 4), 0.1, dino)
        >>> sorted(terms), terms["loss"].shape
        (['cls', 'loss', 'n_match', 'patch'], torch.Size([]))
    """
    n_pairs, batch, dev = len(pairs), student_cls.shape[1], student_cls.device
    t_idx = torch.tensor([i for i, _ in pairs], device=dev)
    s_idx = torch.tensor([j for _, j in pairs], device=dev)
    h_cls = soft_cross_entropy(teacher_cls_probs[t_idx], student_cls[s_idx], student_temp)  # [P, B]
    if patch is not None:
        n_patch = patch.rows.count.to(h_cls.device)
    else:
        n_patch = torch.zeros(n_pairs * batch, dtype=torch.long, device=h_cls.device)
    cls_w, patch_w = weights(n_patch.view(n_pairs, batch))
    loss = (cls_w * h_cls).mean()
    patch_mean = h_cls.new_zeros(())
    if patch is not None and patch.student.shape[0] > 0:
        patch_term, patch_mean = _patch_term(patch, n_patch, patch_w, student_temp)
        loss = loss + patch_term
    return {"loss": loss, "cls": h_cls.mean().detach(), "patch": patch_mean.detach(),
            "n_match": n_patch.float().mean()}
